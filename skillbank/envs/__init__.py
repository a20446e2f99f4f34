"""Simulated environments: demo generation, OOD variations and evaluation (Meta-World v3).

`skillbank.envs.metaworld` imports Meta-World and MuJoCo only when it is used, so importing
skillbank stays cheap for commands that never touch a simulator.
"""
