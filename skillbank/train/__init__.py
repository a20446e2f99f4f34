"""Training: demos (LeRobotDataset v3), the behaviour-cloning trainer, external trainer commands.

Import from the submodules (``skillbank.train.trainer``, ``skillbank.train.finetune``,
``skillbank.train.demos``); nothing is re-exported here so that importing one piece never pulls
in the others.
"""
