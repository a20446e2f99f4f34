"""Group presets against key names as the real policy code produces them.

Key names follow: huggingface/lerobot src/lerobot/policies/pi0/modeling_pi0.py,
pi05/modeling_pi05.py, pi0/paligemma_with_expert.py (older layout),
smolvla/modeling_smolvla.py + smolvlm_with_expert.py; Physical-Intelligence/openpi
src/openpi/models/pi0.py, gemma.py, siglip.py (big_vision ViT) and
src/openpi/models_pytorch/pi0_pytorch.py + gemma_pytorch.py.
"""

from __future__ import annotations

import json

import pytest

from skillbank.groups import (
    GROUPS,
    PRESETS,
    GroupsError,
    Preset,
    describe,
    detect_preset,
    from_description,
    get_preset,
    load_rules_file,
)


def _under(prefix: str, suffixes, group):
    return {prefix + s: group for s in suffixes}


# --- HF transformers module trees (as wrapped by LeRobot / openpi-PyTorch) ---

SIGLIP = [
    "vision_model.embeddings.patch_embedding.weight",
    "vision_model.embeddings.patch_embedding.bias",
    "vision_model.embeddings.position_embedding.weight",
    *(
        f"vision_model.encoder.layers.{i}.{m}"
        for i in (0, 26)
        for m in (
            "self_attn.q_proj.weight",
            "self_attn.k_proj.weight",
            "self_attn.v_proj.bias",
            "self_attn.out_proj.weight",
            "layer_norm1.weight",
            "layer_norm2.bias",
            "mlp.fc1.weight",
            "mlp.fc2.bias",
        )
    ),
    "vision_model.post_layernorm.weight",
]

DECODER_LAYERS = [
    f"layers.{i}.{m}"
    for i in (0, 17)
    for m in (
        "self_attn.q_proj.weight",
        "self_attn.k_proj.weight",
        "self_attn.v_proj.weight",
        "self_attn.o_proj.weight",
        "mlp.gate_proj.weight",
        "mlp.up_proj.weight",
        "mlp.down_proj.weight",
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
    )
]

# pi0.5's action expert uses adaRMS: its norms are Linear layers ("dense").
ADARMS_EXPERT_LAYERS = [
    f"layers.{i}.{m}"
    for i in (0, 17)
    for m in (
        "self_attn.q_proj.weight",
        "self_attn.o_proj.weight",
        "mlp.down_proj.weight",
        "input_layernorm.dense.weight",
        "input_layernorm.dense.bias",
        "post_attention_layernorm.dense.weight",
    )
]

PI0_HEADS = ["state_proj", "action_in_proj", "action_out_proj", "action_time_mlp_in", "action_time_mlp_out"]
PI05_HEADS = ["action_in_proj", "action_out_proj", "time_mlp_in", "time_mlp_out"]


def _heads(prefix: str, heads, sep=".", params=("weight", "bias")):
    return {f"{prefix}{h}{sep}{p}": "action" for h in heads for p in params}


def _pi0_torch(root: str, *, pi05: bool) -> dict[str, str | None]:
    """PI0Pytorch state dict (transformers >= 4.52 layout) under ``root``."""
    pg = root + "paligemma_with_expert.paligemma."
    ex = root + "paligemma_with_expert.gemma_expert."
    expert_layers = ADARMS_EXPERT_LAYERS if pi05 else DECODER_LAYERS
    expert_norm = "model.norm.dense.weight" if pi05 else "model.norm.weight"
    return {
        **_under(pg + "model.vision_tower.", SIGLIP, "vision"),
        **_under(pg + "model.multi_modal_projector.", ["linear.weight", "linear.bias"], "vision"),
        **_under(pg + "model.language_model.", ["embed_tokens.weight", "norm.weight"], "language"),
        **_under(pg + "model.language_model.", DECODER_LAYERS, "language"),
        pg + "lm_head.weight": "language",
        **_under(ex + "model.", expert_layers, "action"),
        ex + expert_norm: "action",
        ex + "lm_head.weight": "action",
        **_heads(root, PI05_HEADS if pi05 else PI0_HEADS),
    }


LEROBOT_BUFFERS = {
    "normalize_inputs.buffer_observation_state.mean": None,
    "normalize_inputs.buffer_observation_state.std": None,
    "normalize_targets.buffer_action.mean": None,
    "unnormalize_outputs.buffer_action.std": None,
}

LEROBOT_PI0 = _pi0_torch("model.", pi05=False)
LEROBOT_PI05 = _pi0_torch("model.", pi05=True)

# LeRobot pi0 before the openpi port (transformers < 4.52): no ".model." under
# paligemma, the LM is a GemmaForCausalLM, normalization buffers in the state dict.
_OLD = "model.paligemma_with_expert."
LEROBOT_PI0_OLD = {
    **_under(_OLD + "paligemma.vision_tower.", SIGLIP, "vision"),
    _OLD + "paligemma.multi_modal_projector.linear.weight": "vision",
    _OLD + "paligemma.language_model.model.embed_tokens.weight": "language",
    **_under(_OLD + "paligemma.language_model.model.", DECODER_LAYERS, "language"),
    _OLD + "paligemma.language_model.model.norm.weight": "language",
    _OLD + "paligemma.language_model.lm_head.weight": "language",
    **_under(_OLD + "gemma_expert.model.", DECODER_LAYERS, "action"),
    _OLD + "gemma_expert.model.norm.weight": "action",
    _OLD + "gemma_expert.lm_head.weight": "action",
    **_heads("model.", PI0_HEADS),
    **LEROBOT_BUFFERS,
}

# openpi's PyTorch port: same tree as LeRobot, but PI0Pytorch is the root.
OPENPI_TORCH_PI05 = _pi0_torch("", pi05=True)

_SV = "model.vlm_with_expert."
IDEFICS3_VISION = [
    "vision_model.embeddings.patch_embedding.weight",
    "vision_model.embeddings.position_embedding.weight",
    *(
        f"vision_model.encoder.layers.{i}.{m}"
        for i in (0, 11)
        for m in ("self_attn.q_proj.weight", "self_attn.out_proj.bias", "layer_norm1.weight", "mlp.fc2.bias")
    ),
    "vision_model.post_layernorm.weight",
]
LEROBOT_SMOLVLA = {
    **_under(_SV + "vlm.model.", IDEFICS3_VISION, "vision"),
    _SV + "vlm.model.connector.modality_projection.proj.weight": "vision",
    _SV + "vlm.model.text_model.embed_tokens.weight": "language",
    **_under(_SV + "vlm.model.text_model.", DECODER_LAYERS, "language"),
    _SV + "vlm.model.text_model.norm.weight": "language",
    _SV + "vlm.lm_head.weight": "language",
    **_under(_SV + "lm_expert.", DECODER_LAYERS, "action"),
    _SV + "lm_expert.norm.weight": "action",
    **_heads("model.", PI0_HEADS),
    **LEROBOT_BUFFERS,
}


# --- openpi JAX params (flax; nested dict flattened with "/") ---

SIGLIP_JAX = [
    "embedding/kernel",
    "embedding/bias",
    "pos_embedding",
    "Transformer/encoderblock/LayerNorm_0/scale",
    "Transformer/encoderblock/LayerNorm_1/bias",
    "Transformer/encoderblock/MlpBlock_0/Dense_0/kernel",
    "Transformer/encoderblock/MlpBlock_0/Dense_1/bias",
    "Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel",
    "Transformer/encoderblock/MultiHeadDotProductAttention_0/key/bias",
    "Transformer/encoderblock/MultiHeadDotProductAttention_0/value/kernel",
    "Transformer/encoderblock/MultiHeadDotProductAttention_0/out/kernel",
    # scan=False names blocks encoderblock_<i>: an "_1" here is NOT the expert
    "Transformer/encoderblock_1/MlpBlock_0/Dense_1/kernel",
    "Transformer/encoder_norm/scale",
    "head/kernel",
    "head/bias",
]
GEMMA_JAX_VLM = [
    "embedder/input_embedding",
    "layers/attn/q_einsum/w",
    "layers/attn/kv_einsum/w",
    "layers/attn/attn_vec_einsum/w",
    "layers/attn/q_einsum/lora_a",
    "layers/mlp/gating_einsum",
    "layers/mlp/linear",
    "layers/pre_attention_norm/scale",
    "layers/pre_ffw_norm/scale",
    "final_norm/scale",
]
GEMMA_JAX_EXPERT = [
    "layers/attn/q_einsum_1/w",
    "layers/attn/kv_einsum_1/w",
    "layers/attn/attn_vec_einsum_1/w",
    "layers/attn/q_einsum_1/lora_b",
    "layers/mlp_1/gating_einsum",
    "layers/mlp_1/linear",
    "layers/mlp_1/gating_einsum_lora_a",
    "layers/pre_attention_norm_1/scale",
    "layers/pre_ffw_norm_1/scale",
    "final_norm_1/scale",
]
# pi0.5: the expert's norms are adaRMS (a Dense_0 inside each *_norm_1)
GEMMA_JAX_EXPERT_ADARMS = [
    "layers/pre_attention_norm_1/Dense_0/kernel",
    "layers/pre_ffw_norm_1/Dense_0/bias",
    "final_norm_1/Dense_0/kernel",
]

OPENPI_JAX_PI0 = {
    **_under("PaliGemma/img/", SIGLIP_JAX, "vision"),
    **_under("PaliGemma/llm/", GEMMA_JAX_VLM, "language"),
    **_under("PaliGemma/llm/", GEMMA_JAX_EXPERT, "action"),
    **_heads("", PI0_HEADS, sep="/", params=("kernel", "bias")),
}
OPENPI_JAX_PI05 = {
    **_under("PaliGemma/img/", SIGLIP_JAX, "vision"),
    **_under("PaliGemma/llm/", GEMMA_JAX_VLM, "language"),
    **_under("PaliGemma/llm/", GEMMA_JAX_EXPERT[:6] + GEMMA_JAX_EXPERT_ADARMS, "action"),
    **_heads("", PI05_HEADS, sep="/", params=("kernel", "bias")),
}
OPENPI_JAX_DOTTED = {k.replace("/", "."): g for k, g in OPENPI_JAX_PI0.items()}
OPENPI_JAX_PARAMS = {"params/" + k + "/value": g for k, g in OPENPI_JAX_PI05.items()}

SKILLBANK_REF = {
    "vision.patch_embed.weight": "vision",
    "vision.blocks.0.attn.qkv.weight": "vision",
    "vision.blocks.1.mlp.fc1.bias": "vision",
    "vision.norm.weight": "vision",
    "language.embed_tokens.weight": "language",
    "language.blocks.0.attn.qkv.weight": "language",
    "language.blocks.1.mlp.fc2.weight": "language",
    "language.norm.weight": "language",
    "action.state_proj.weight": "action",
    "action.action_in_proj.weight": "action",
    "action.blocks.0.attn.qkv.weight": "action",
    "action.action_out_proj.bias": "action",
}

FAMILIES = [
    ("lerobot-pi0", LEROBOT_PI0),
    ("lerobot-pi0", LEROBOT_PI05),
    ("lerobot-pi0", LEROBOT_PI0_OLD),
    ("lerobot-smolvla", LEROBOT_SMOLVLA),
    ("openpi", OPENPI_JAX_PI0),
    ("openpi", OPENPI_JAX_PI05),
    ("openpi", OPENPI_JAX_DOTTED),
    ("openpi", OPENPI_JAX_PARAMS),
    ("openpi", OPENPI_TORCH_PI05),
    ("skillbank-ref", SKILLBANK_REF),
]
FAMILY_IDS = [
    "lerobot-pi0",
    "lerobot-pi05",
    "lerobot-pi0-old",
    "lerobot-smolvla",
    "openpi-jax-pi0",
    "openpi-jax-pi05",
    "openpi-jax-dotted",
    "openpi-jax-params",
    "openpi-torch-pi05",
    "skillbank-ref",
]


@pytest.mark.parametrize(("family", "expected"), FAMILIES, ids=FAMILY_IDS)
def test_detects_family_and_groups_every_key(family, expected):
    assert len(expected) >= 20 or family == "skillbank-ref"
    preset = detect_preset(expected)
    assert preset.name == family
    got = preset.assign(expected)
    wrong = {k: (got[k], g) for k, g in expected.items() if got[k] != g}
    assert not wrong, wrong
    # every group is actually used, so the per-group alphas mean something
    assert set(GROUPS) <= set(got.values())


@pytest.mark.parametrize(("family", "expected"), FAMILIES, ids=FAMILY_IDS)
def test_detection_ignores_key_order(family, expected):
    assert detect_preset(reversed(list(expected))).name == family


def test_action_heads_win_in_every_family():
    roots = {"skillbank-ref": ["action."], "openpi": ["", "params/"]}
    for preset in PRESETS.values():
        for root in roots.get(preset.name, ["model."]):
            for head in (*PI0_HEADS, *PI05_HEADS):
                for leaf in (".weight", "/kernel") if preset.name == "openpi" else (".weight",):
                    name = f"{root}{head}{leaf}"
                    assert preset.group_of(name) == "action", (preset.name, name)


def test_lerobot_pi0_accepts_keys_without_the_model_prefix():
    # explicitly chosen, it must not silently leave everything ungrouped
    preset = get_preset("lerobot-pi0")
    assert preset.assign(OPENPI_TORCH_PI05) == OPENPI_TORCH_PI05


def test_openpi_expert_suffix_only_counts_inside_the_llm():
    openpi = get_preset("openpi")
    assert openpi.group_of("PaliGemma/llm/layers/mlp_1/linear") == "action"
    assert openpi.group_of("PaliGemma/llm/layers/mlp/linear") == "language"
    assert openpi.group_of("PaliGemma/llm/layers/mlp_10/linear") == "action"
    assert openpi.group_of("PaliGemma/img/Transformer/encoderblock_1/LayerNorm_1/scale") == "vision"
    # adaRMS modulation of the expert has Dense_0 (suffix 0) under a *_1 norm
    assert openpi.group_of("PaliGemma/llm/final_norm_1/Dense_0/kernel") == "action"


def test_generic_fallback_for_unknown_families():
    names = {
        "backbone.visual.patch_embed.proj.weight": "vision",
        "backbone.visual.blocks.0.attn.qkv.weight": "vision",
        "backbone.image_encoder.stem.weight": "vision",
        "backbone.llm.layers.0.mlp.up.weight": "language",
        "backbone.llm.embed_tokens.weight": "language",
        "backbone.lm_head.weight": "language",
        "policy.action_expert.layers.0.attn.weight": "action",
        "policy.action_decoder.weight": "action",
        "policy.state_proj.weight": "action",
        "policy.time_mlp_in.weight": "action",
        "running_stats.count": None,
    }
    preset = detect_preset(names)
    assert preset.name == "generic"
    assert preset.assign(names) == names


def test_generic_does_not_take_the_with_expert_wrapper_for_the_expert():
    generic = get_preset("generic")
    pg = "model.paligemma_with_expert."
    assert generic.group_of(pg + "paligemma.model.language_model.layers.0.mlp.up_proj.weight") == "language"
    assert generic.group_of(pg + "paligemma.vision_tower.vision_model.post_layernorm.weight") == "vision"
    assert generic.group_of(pg + "gemma_expert.model.layers.0.mlp.up_proj.weight") == "action"
    assert generic.group_of("model.vlm_with_expert.lm_expert.layers.0.mlp.up_proj.weight") == "action"
    assert generic.group_of("PaliGemma/img/head/kernel") == "vision"


def test_weak_specific_match_falls_back_to_generic():
    # two pi0 heads among many foreign names: not a pi0 checkpoint
    names = ["model.action_in_proj.weight", "model.state_proj.weight"]
    names += [f"encoder.block{i}.w" for i in range(10)]
    assert detect_preset(names).name == "generic"
    assert detect_preset([]).name == "generic"


def test_get_preset_and_unknown_name():
    assert get_preset("openpi") is PRESETS["openpi"]
    with pytest.raises(GroupsError) as err:
        get_preset("pi1")
    msg = str(err.value)
    assert msg.startswith("unknown group preset 'pi1' (known: ")
    for name in ("generic", "lerobot-pi0", "lerobot-smolvla", "openpi", "skillbank-ref"):
        assert name in msg
    assert isinstance(err.value, ValueError)


def test_preset_validates_its_rules():
    with pytest.raises(GroupsError, match="unknown group 'motor'"):
        Preset("x", (("motor", "a"),))
    with pytest.raises(GroupsError, match="bad regex"):
        Preset("x", (("vision", "a("),))
    # lists are accepted and frozen into tuples, so a preset is hashable
    p = Preset("x", [["vision", "img"]])
    assert p.rules == (("vision", "img"),)
    assert hash(p) == hash(Preset("x", (("vision", "img"),)))


def test_first_matching_rule_wins():
    p = Preset("x", (("action", "expert"), ("language", "layers")))
    assert p.group_of("gemma_expert.layers.0.w") == "action"
    assert p.group_of("lm.layers.0.w") == "language"
    assert p.group_of("other") is None


def test_describe_is_json_and_round_trips():
    for preset in PRESETS.values():
        record = describe(preset)
        assert json.loads(json.dumps(record)) == record
        assert record["name"] == preset.name
        assert [(r["group"], r["pattern"]) for r in record["rules"]] == list(preset.rules)
        assert from_description(record) == preset
    with pytest.raises(GroupsError, match="malformed"):
        from_description({"name": "x"})


# --- rules files ---


def _write(tmp_path, text, name="my.rules"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_rules_file_parses_in_order(tmp_path):
    path = _write(
        tmp_path,
        "# my policy\n"
        "\n"
        "action: ^head\\.\n"
        "  Vision : ^(?:cam|img)\\.   \n"
        "   # indented comment\n"
        "language: ^text\\.\n"
        "action: .\n",
    )
    preset = load_rules_file(path)
    assert preset.name == "file:my.rules"
    assert preset.rules == (
        ("action", r"^head\."),
        ("vision", r"^(?:cam|img)\."),
        ("language", r"^text\."),
        ("action", "."),
    )
    assert preset.assign(["head.w", "cam.w", "img.b", "text.w", "rest"]) == {
        "head.w": "action",
        "cam.w": "vision",
        "img.b": "vision",
        "text.w": "language",
        "rest": "action",
    }
    assert load_rules_file(str(path)) == preset


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("vision: ok\nlanguage: (unclosed\n", r"my\.rules:2: bad regex '\(unclosed'"),
        ("motor: ^m\\.\n", r"my\.rules:1: unknown group 'motor' \(expected one of vision, language, action"),
        ("preset: lerobot-pi0\n", r"my\.rules:1: unknown group 'preset'"),
        ("vision ^img\n", r"my\.rules:1: expected 'GROUP: REGEX'"),
        (": ^img\n", r"my\.rules:1: expected 'GROUP: REGEX'"),
        ("vision:\n", r"my\.rules:1: empty regex"),
        ("", r"my\.rules: no rules"),
        ("# only\n\n   # comments\n", r"my\.rules: no rules"),
    ],
)
def test_rules_file_errors_are_one_clear_line(tmp_path, text, message):
    with pytest.raises(GroupsError, match=message) as err:
        load_rules_file(_write(tmp_path, text))
    assert "\n" not in str(err.value)


def test_rules_file_missing(tmp_path):
    with pytest.raises(GroupsError, match="cannot read rules file") as err:
        load_rules_file(tmp_path / "nope.rules")
    assert "\n" not in str(err.value)
