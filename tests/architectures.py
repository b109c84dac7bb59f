"""Tiny random-init configs of real Hugging Face architectures, one per row: the matrix test's inputs
(tests/test_matrix.py). Small enough that a variant builds in a few seconds on one CPU core."""

TEXT = dict(vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=64)
DECODER = dict(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64)
IMAGE = dict(image_size=32, num_labels=5)
CLIP_TEXT = dict(vocab_size=200, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=32)
CLIP_VISION = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                   intermediate_size=64)

# name -> (task, source config)
ARCHITECTURES = {
    # text encoders (feature-extraction)
    "bert": ("feature-extraction", dict(model_type="bert", **TEXT)),
    "roberta": ("feature-extraction", dict(model_type="roberta", **{**TEXT, "max_position_embeddings": 70})),
    "distilbert": ("feature-extraction", dict(model_type="distilbert", vocab_size=320, dim=32, n_layers=2, n_heads=2,
                                              hidden_dim=64, max_position_embeddings=64)),
    "albert": ("feature-extraction", dict(model_type="albert", embedding_size=16, **TEXT)),
    "electra": ("feature-extraction", dict(model_type="electra", embedding_size=16, **TEXT)),
    "deberta_v2": ("feature-extraction", dict(model_type="deberta-v2", **TEXT)),
    "mpnet": ("feature-extraction", dict(model_type="mpnet", **{**TEXT, "max_position_embeddings": 70})),
    # sequence classifiers. initializer_range 0.1: with the default 0.02 a random head's logits are ~0.005, so
    # int8's rounding of 2e-4 turns a 2-label logit vector's cosine to 0.95 (roberta_cls); at 0.1 the logits
    # are ~0.1-1 as a trained head's, and int8 / int4 verify with margin (>= 0.997 / >= 0.987). At 0.2 the
    # random weights are wide enough for int4's 16 levels to miss (0.72)
    "bert_cls": ("text-classification", dict(model_type="bert", num_labels=3, initializer_range=0.1, **TEXT)),
    "distilbert_cls": ("text-classification", dict(model_type="distilbert", vocab_size=320, dim=32, n_layers=2,
                                                   n_heads=2, hidden_dim=64, num_labels=3, initializer_range=0.1)),
    "roberta_cls": ("text-classification", dict(model_type="roberta", num_labels=2, initializer_range=0.1,
                                                **{**TEXT, "max_position_embeddings": 70})),
    # vision classifiers
    "vit": ("image-classification", dict(model_type="vit", patch_size=8, hidden_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=64, **IMAGE)),
    "deit": ("image-classification", dict(model_type="deit", patch_size=8, hidden_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, intermediate_size=64, **IMAGE)),
    "convnext": ("image-classification", dict(model_type="convnext", hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
                                              **IMAGE)),
    "resnet": ("image-classification", dict(model_type="resnet", embedding_size=8, hidden_sizes=[8, 16, 24, 32],
                                            depths=[1, 1, 1, 1], layer_type="basic", **IMAGE)),
    "swin": ("image-classification", dict(model_type="swin", patch_size=4, embed_dim=8, depths=[1, 1],
                                          num_heads=[1, 2], window_size=4, **IMAGE)),
    # dual encoders
    "clip": ("zero-shot-image-classification", dict(model_type="clip", projection_dim=16,
                                                     text_config=dict(CLIP_TEXT, eos_token_id=2),
                                                     vision_config=CLIP_VISION)),
    "siglip": ("zero-shot-image-classification", dict(model_type="siglip", text_config=CLIP_TEXT,
                                                       vision_config=CLIP_VISION)),
    # decoder LMs, logits only
    "llama": ("text-generation", dict(model_type="llama", **DECODER)),
    "mistral": ("text-generation", dict(model_type="mistral", **DECODER)),
    "qwen2": ("text-generation", dict(model_type="qwen2", **DECODER)),
    "gpt2": ("text-generation", dict(model_type="gpt2", vocab_size=256, n_embd=32, n_layer=2, n_head=2, n_positions=64)),
    "phi": ("text-generation", dict(model_type="phi", **{k: v for k, v in DECODER.items() if k != "num_key_value_heads"})),
    "gemma": ("text-generation", dict(model_type="gemma", head_dim=8, **DECODER)),
}

VARIANTS = (
    dict(format="onnx", precision="fp32"),
    dict(format="onnx", precision="fp16"),
    dict(format="onnx", precision="int8"),
    dict(format="onnx", precision="int8", calibration="static"),
    dict(format="onnx", precision="int4"),
    dict(format="torch", precision="fp32"),
    dict(format="torch", precision="fp16"),
    dict(format="torch", precision="bf16"),
)


def spec_text(names, variants=VARIANTS) -> str:
    """A spec (YAML, which JSON is) building `names` with `variants`, batching off (mbs 4, no queue)."""
    import json

    models = []
    for name in names:
        task, config = ARCHITECTURES[name]
        model = {"name": name, "task": task, "source": {"config": config}, "variants": [dict(v) for v in variants],
                 "shapes": {"max_sequence_length": 32, "sequence_length": 8}}
        if task == "text-generation":  # the logits-only forward
            model["max_batch_size"], model["generation"] = 0, False
        models.append(model)
    return json.dumps({"defaults": {"max_batch_size": 4, "dynamic_batching": False, "warmup": False},
                       "models": models}, indent=1)
