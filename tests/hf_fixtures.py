"""Offline Hugging Face objects for tests: tokenizers of several model families and tiny seq2seq models.

Nothing here touches the network. Tokenizers are WordLevel models built with the `tokenizers` library and
wrapped in `transformers.PreTrainedTokenizerFast`, with the special-token layout of a real family (which id
is pad, eos, bos, whether pad == eos, which side pads, whether token_type_ids are model inputs). Models are
built from tiny configs (d_model 8, one layer, VOCAB_SIZE tokens) with random weights.

    make_tokenizer(family, **overrides)  a fresh tokenizer: tests may change padding_side etc.
    make_model(name)                     a cached tiny model (built once per process, never modify it)
    SEQ2SEQ_MODELS                       model name -> tokenizer family that goes with it
    word_ids(tokenizer)                  the ids of the ordinary (non-special) tokens

and helpers to compare a drop-in with the class it replaces:

    assert_same_batch(ours, theirs)      same container type, key order, per-key type / dtype / shape / values
    assert_same_outcome(f, g, *args)     same batch, or the same exception type
    snapshot(x), assert_unchanged(x, s)  the caller's features were not modified

Families (special ids, in vocabulary order):

    t5       <pad>=0 </s>=1 <unk>=2                         (T5 family, Pegasus, PegasusX, BigBirdPegasus)
    bart     <s>=0 <pad>=1 </s>=2 <unk>=3, <mask> last      (BART, MVP, LED, FSMT, M2M100, Blenderbot)
    mbart    bart + language codes en_XX, ro_RO (last ids)  (mBART, PLBart)
    marian   </s>=0 <unk>=1, <pad> last                     pad is the highest id
    whisper  <|endoftext|>=0 is bos, eos and pad            pad == eos
    bert     [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4       token_type_ids are inputs, pad_token_type_id=1
    qwen     <|endoftext|>=0 is eos and pad, <|im_start|>=1, <|im_end|>=2   pad == eos (causal LM)
    llama    <unk>=0 <s>=1 </s>=2, no pad token             (causal LM; padding must raise)

`overrides` go to the PreTrainedTokenizerFast constructor (padding_side="left", model_max_length=16, ...),
except `pad_token_type_id`, which the transformers 5 constructor ignores and is set on the tokenizer after.
"""
from __future__ import annotations

import functools

VOCAB_SIZE = 100

# family -> (special tokens in id order, constructor kwargs naming them, model_input_names)
_FAMILIES = {
    "t5": (
        ["<pad>", "</s>", "<unk>"],
        {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"},
        ["input_ids", "attention_mask"],
    ),
    "bart": (
        ["<s>", "<pad>", "</s>", "<unk>"],
        {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>", "mask_token": "<mask>"},
        ["input_ids", "attention_mask"],
    ),
    "mbart": (
        ["<s>", "<pad>", "</s>", "<unk>"],
        {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"},
        ["input_ids", "attention_mask"],
    ),
    "marian": (
        ["</s>", "<unk>"],
        {"eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"},
        ["input_ids", "attention_mask"],
    ),
    "whisper": (
        ["<|endoftext|>"],
        {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
         "unk_token": "<|endoftext|>"},
        ["input_ids", "attention_mask"],
    ),
    "bert": (
        ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
        {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]",
         "mask_token": "[MASK]"},
        ["input_ids", "token_type_ids", "attention_mask"],
    ),
    "qwen": (
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"},
        ["input_ids", "attention_mask"],
    ),
    "llama": (
        ["<unk>", "<s>", "</s>"],
        {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"},
        ["input_ids", "attention_mask"],
    ),
}

# Tokens appended after the ordinary words, so they get the highest ids (as in the real vocabularies).
_TRAILING = {"bart": ["<mask>"], "mbart": ["en_XX", "ro_RO"], "marian": ["<pad>"]}

FAMILIES = tuple(_FAMILIES)


@functools.lru_cache(maxsize=None)
def _vocab(family: str) -> tuple:
    specials, _, _ = _FAMILIES[family]
    trailing = _TRAILING.get(family, [])
    n_words = VOCAB_SIZE - len(specials) - len(trailing)
    return tuple(specials + [f"w{i}" for i in range(n_words)] + trailing)


def make_tokenizer(family: str, **overrides):
    """A fresh PreTrainedTokenizerFast with `family`'s special-token layout (see the module docstring)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if family not in _FAMILIES:
        raise ValueError(f"unknown tokenizer family {family!r}; expected one of {FAMILIES}")
    _, special_kwargs, input_names = _FAMILIES[family]
    vocab = {tok: i for i, tok in enumerate(_vocab(family))}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=special_kwargs["unk_token"]))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    # bert pads token types with 1 (not 0), so a test notices a collator that pads them with 0
    pad_token_type_id = overrides.pop("pad_token_type_id", 1 if family == "bert" else 0)
    kwargs = dict(special_kwargs, model_input_names=list(input_names), padding_side="right")
    if family == "mbart":
        kwargs["additional_special_tokens"] = ["en_XX", "ro_RO"]
    kwargs.update(overrides)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
    tok._pad_token_type_id = pad_token_type_id
    return tok


def word_ids(tokenizer) -> range:
    """Ids of the ordinary tokens ("w0", "w1", ...): never a special token of the family."""
    first = tokenizer.convert_tokens_to_ids("w0")
    return range(first, first + sum(1 for t in tokenizer.get_vocab() if t[0] == "w" and t[1:].isdigit()))


# Tiny seq2seq models: name -> (tokenizer family, config class, model class, config kwargs). Every model has
# d_model 8, one encoder and one decoder layer, 2 heads and VOCAB_SIZE tokens; ids follow the family.
_BART_IDS = {"pad_token_id": 1, "bos_token_id": 0, "eos_token_id": 2}
_BART_DIMS = {"d_model": 8, "encoder_layers": 1, "decoder_layers": 1, "encoder_attention_heads": 2,
              "decoder_attention_heads": 2, "encoder_ffn_dim": 16, "decoder_ffn_dim": 16}
_T5_DIMS = {"d_model": 8, "d_kv": 4, "d_ff": 16, "num_layers": 1, "num_decoder_layers": 1, "num_heads": 2}
_T5_IDS = {"pad_token_id": 0, "eos_token_id": 1, "decoder_start_token_id": 0}

_MODELS = {
    # standard shift: position 0 = decoder_start_token_id
    "t5": ("t5", "T5Config", "T5ForConditionalGeneration", dict(_T5_DIMS, **_T5_IDS)),
    "mt5": ("t5", "MT5Config", "MT5ForConditionalGeneration", dict(_T5_DIMS, **_T5_IDS)),
    "umt5": ("t5", "UMT5Config", "UMT5ForConditionalGeneration", dict(_T5_DIMS, **_T5_IDS)),
    "longt5": ("t5", "LongT5Config", "LongT5ForConditionalGeneration", dict(_T5_DIMS, **_T5_IDS)),
    "bart": ("bart", "BartConfig", "BartForConditionalGeneration",
             dict(_BART_DIMS, **_BART_IDS, decoder_start_token_id=2, max_position_embeddings=64)),
    "pegasus": ("t5", "PegasusConfig", "PegasusForConditionalGeneration",
                dict(_BART_DIMS, **_T5_IDS, max_position_embeddings=64)),
    "marian": ("marian", "MarianConfig", "MarianMTModel",
               dict(_BART_DIMS, pad_token_id=VOCAB_SIZE - 1, eos_token_id=0,
                    decoder_start_token_id=VOCAB_SIZE - 1, max_position_embeddings=64)),
    "bigbird_pegasus": ("t5", "BigBirdPegasusConfig", "BigBirdPegasusForConditionalGeneration",
                        dict(_BART_DIMS, **_T5_IDS, max_position_embeddings=64, attention_type="original_full")),
    "mvp": ("bart", "MvpConfig", "MvpForConditionalGeneration",
            dict(_BART_DIMS, **_BART_IDS, decoder_start_token_id=2, max_position_embeddings=64)),
    "pegasus_x": ("t5", "PegasusXConfig", "PegasusXForConditionalGeneration",
                  dict(_BART_DIMS, **_T5_IDS, max_position_embeddings=64, block_size=4, num_global_tokens=2)),
    "switch_transformers": ("t5", "SwitchTransformersConfig", "SwitchTransformersForConditionalGeneration",
                            dict(_T5_DIMS, **_T5_IDS, num_experts=2, num_sparse_encoder_layers=1,
                                 num_sparse_decoder_layers=1)),
    "led": ("bart", "LEDConfig", "LEDForConditionalGeneration",
            dict(_BART_DIMS, **_BART_IDS, decoder_start_token_id=2, max_encoder_position_embeddings=64,
                 max_decoder_position_embeddings=64, attention_window=4)),
    # wrap the last non-pad label (the language id) into position 0
    "mbart": ("mbart", "MBartConfig", "MBartForConditionalGeneration",
              dict(_BART_DIMS, **_BART_IDS, max_position_embeddings=64)),
    "plbart": ("mbart", "PLBartConfig", "PLBartForConditionalGeneration",
               dict(_BART_DIMS, **_BART_IDS, max_position_embeddings=64)),
    # wrap, and the labels tensor itself gets -100 -> pad
    "fsmt": ("bart", "FSMTConfig", "FSMTForConditionalGeneration",
             dict(_BART_DIMS, **_BART_IDS, decoder_start_token_id=2, langs=["en", "de"], src_vocab_size=VOCAB_SIZE,
                  tgt_vocab_size=VOCAB_SIZE, max_position_embeddings=64)),
    # no prepare_decoder_input_ids_from_labels: the collator adds no decoder_input_ids
    "whisper": ("whisper", "WhisperConfig", "WhisperForConditionalGeneration",
                dict(_BART_DIMS, pad_token_id=0, bos_token_id=0, eos_token_id=0, decoder_start_token_id=0,
                     num_mel_bins=8, max_source_positions=16, max_target_positions=64)),
    "m2m100": ("bart", "M2M100Config", "M2M100ForConditionalGeneration",
               dict(_BART_DIMS, **_BART_IDS, decoder_start_token_id=2, max_position_embeddings=64)),
    "blenderbot": ("bart", "BlenderbotConfig", "BlenderbotForConditionalGeneration",
                   dict(_BART_DIMS, **_BART_IDS, decoder_start_token_id=0, max_position_embeddings=64)),
}

SEQ2SEQ_MODELS = {name: spec[0] for name, spec in _MODELS.items()}


@functools.lru_cache(maxsize=None)
def make_model(name: str):
    """A tiny model with random weights (seeded), built once per process and shared: do not modify it."""
    import torch
    import transformers

    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(_MODELS)}")
    _, config_cls, model_cls, kwargs = _MODELS[name]
    config = getattr(transformers, config_cls)(vocab_size=VOCAB_SIZE, **kwargs)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = getattr(transformers, model_cls)(config)
    return model.eval()


# ---- comparing a drop-in with the class it replaces --------------------------------------------------------


def assert_same_batch(ours, theirs):
    """Same container type, same keys in the same order, and per key the same type, dtype, shape and values
    (torch.equal / np.array_equal, so NaN-free integer data compares exactly)."""
    import numpy as np
    import torch

    assert type(ours) is type(theirs), f"container: {type(ours).__name__} vs {type(theirs).__name__}"
    assert list(ours.keys()) == list(theirs.keys()), f"keys: {list(ours.keys())} vs {list(theirs.keys())}"
    for key in theirs.keys():
        a, b = ours[key], theirs[key]
        assert type(a) is type(b), f"{key}: {type(a).__name__} vs {type(b).__name__}"
        if isinstance(b, torch.Tensor):
            assert a.dtype == b.dtype, f"{key}: dtype {a.dtype} vs {b.dtype}"
            assert a.shape == b.shape, f"{key}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
            assert torch.equal(a, b), f"{key}:\n{a}\nvs\n{b}"
        elif isinstance(b, np.ndarray):
            assert a.dtype == b.dtype, f"{key}: dtype {a.dtype} vs {b.dtype}"
            assert a.shape == b.shape, f"{key}: shape {a.shape} vs {b.shape}"
            if b.dtype == object:
                assert all(np.array_equal(x, y) for x, y in zip(a, b)), f"{key}:\n{a}\nvs\n{b}"
            else:
                assert np.array_equal(a, b), f"{key}:\n{a}\nvs\n{b}"
        else:
            assert a == b, f"{key}: {a!r} vs {b!r}"


def outcome(fn, *args, **kwargs):
    """("ok", result) or ("raised", exception): lets a test compare a drop-in's failure with the original's."""
    try:
        return "ok", fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - every failure is compared by type
        return "raised", e


def assert_same_outcome(ours_fn, theirs_fn, *args, **kwargs):
    """Both succeed with the same batch, or both raise the same exception type. Returns our result (or error)."""
    kind, theirs = outcome(theirs_fn, *args, **kwargs)
    our_kind, ours = outcome(ours_fn, *args, **kwargs)
    if kind == "raised":
        assert our_kind == "raised", f"transformers raised {type(theirs).__name__}: {theirs}; we returned {ours}"
        assert type(ours) is type(theirs), (
            f"we raised {type(ours).__name__}: {ours}\ntransformers raised {type(theirs).__name__}: {theirs}"
        )
    else:
        if our_kind == "raised":
            raise AssertionError(f"transformers succeeded, we raised {type(ours).__name__}: {ours}") from ours
        assert_same_batch(ours, theirs)
    return ours


def snapshot(obj):
    """A deep copy of features, to check later that a collator did not modify them."""
    import copy

    return copy.deepcopy(obj)


def assert_unchanged(obj, before, path="features"):
    """obj still equals its snapshot `before`, recursively (lists, dicts, numpy arrays, tensors, dtypes)."""
    import numpy as np
    import torch

    assert type(obj) is type(before), f"{path}: type changed to {type(obj).__name__}"
    if isinstance(obj, torch.Tensor):
        assert obj.dtype == before.dtype and torch.equal(obj, before), f"{path} was modified"
    elif isinstance(obj, np.ndarray):
        assert obj.dtype == before.dtype and np.array_equal(obj, before), f"{path} was modified"
    elif isinstance(obj, dict):
        assert list(obj) == list(before), f"{path}: keys changed"
        for k in obj:
            assert_unchanged(obj[k], before[k], f"{path}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        assert len(obj) == len(before), f"{path}: length changed"
        for i, (a, b) in enumerate(zip(obj, before)):
            assert_unchanged(a, b, f"{path}[{i}]")
    else:
        assert obj == before, f"{path} changed: {before!r} -> {obj!r}"
