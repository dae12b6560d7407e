"""Tiny, randomly initialised BLIP-2 / InstructBLIP checkpoints, built offline for tests.

Each checkpoint is written with ``save_pretrained`` and loads back through the same path as a real
Salesforce checkpoint: ``AutoModelForImageTextToText.from_pretrained(dir)`` and
``AutoProcessor.from_pretrained(dir)``. Nothing is downloaded: the tokenizers are built in code from a
small English corpus (see :data:`_CORPUS`) by constructing the transformers tokenizer classes from a
vocabulary (and merges), so the pipeline that is saved is the one the class rebuilds on reload. The
image processor is transformers' BLIP image processor (its PIL backend, ``BlipImageProcessorPil``, since
torchvision is absent; it is saved as ``"image_processor_type": "BlipImageProcessor"`` like the real ones)
with the mean / std / bicubic resampling of the real checkpoints and the tiny vision tower's 30 px size.

Families (see :data:`FAMILIES`):

* ``blip2-opt``: ``Blip2ForConditionalGeneration`` + OPT, GPT-2 byte-level BPE tokenizer (``</s>`` is bos,
  eos and unk, ``<pad>`` = 1, like facebook/opt).
* ``blip2-flan-t5``: ``Blip2ForConditionalGeneration`` + T5 (gated-gelu, like Flan-T5), T5 Unigram /
  Metaspace tokenizer (``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2, sentinel ``<extra_id_*>`` tokens at the end).
* ``instructblip-flan-t5``: ``InstructBlipForConditionalGeneration`` + T5, plus a BERT WordPiece
  ``qformer_tokenizer/``.
* ``instructblip-vicuna``: ``InstructBlipForConditionalGeneration`` + LLaMA, LLaMA BPE tokenizer with byte
  fallback (``<unk>`` = 0, ``<s>`` = 1, ``</s>`` = 2), plus the BERT ``qformer_tokenizer/``.

Layouts
-------
``legacy=False`` (default) is the layout of the Salesforce checkpoints since transformers 4.46: the
tokenizer holds the special token ``<image>``, the language model's embeddings cover it,
``config.image_token_index`` is its id and ``processor_config.json`` records ``num_query_tokens``, so that
the processor prepends ``num_query_tokens`` ``<image>`` tokens which the model replaces by the Q-Former
output.

``legacy=True`` writes the layout of older checkpoints: no ``<image>`` in the tokenizer files, no
``processor_config.json`` (the image processor is in ``preprocessor_config.json``, which names the
processor class, as in the pre-4.46 repositories), ``config.image_token_index`` absent (None) and
embeddings sized for the tokenizer without ``<image>``.

What transformers 5.23 does when it loads a legacy checkpoint (checked by ``tests/test_tiny.py``):

* ``Blip2Processor.__init__`` / ``InstructBlipProcessor.__init__`` add ``<image>`` to the tokenizer by
  themselves whenever the tokenizer has no ``image_token`` attribute
  (``transformers/models/blip_2/processing_blip_2.py``, ``__init__``; same in
  ``instructblip/processing_instructblip.py``). So after ``AutoProcessor.from_pretrained`` of a legacy
  checkpoint, ``len(processor.tokenizer)`` is one more than the model's ``vocab_size``: the new id is
  outside the embedding matrix. ``processor.num_query_tokens`` is None.
* BLIP-2 with ``num_query_tokens`` None: the processor silently does not prepend any ``<image>`` token.
  ``generate`` then compares ``input_ids == None`` (``config.image_token_index`` is None) and fails with
  an ``AttributeError`` (``'bool' object has no attribute 'unsqueeze'``) inside ``generate``; without
  text it fails building ``torch.tensor([None, ...])`` (``TypeError``).
* InstructBLIP with ``num_query_tokens`` None: the processor itself raises ``TypeError`` (``"<image>" *
  None``) as soon as images and text are passed together. (With an image and no text, InstructBLIP's
  ``generate`` fails with ``TypeError`` from ``torch.ones_like(None)`` in both layouts: always pass an
  instruction.)

The engine must therefore repair legacy checkpoints (set ``processor.num_query_tokens`` from
``config.num_query_tokens``, make sure ``<image>`` is in the tokenizer, resize the embeddings to cover it,
set ``config.image_token_index``).

Other things the tiny checkpoints share with the real ones in transformers 5.23:

* The reloaded tokenizer has no ``image_token`` attribute even in the modern layout (``<image>`` is an
  ordinary added special token), so the processor calls ``add_tokens`` again at load time; the token
  already exists, so nothing changes.
* T5: ``T5Config`` forces ``tie_word_embeddings = True`` (``models/t5/configuration_t5.py``,
  ``__post_init__``), but Flan-T5 checkpoints store a separate ``lm_head``. ``from_pretrained`` keeps the
  two apart and logs a warning ("both are present in the checkpoints with different values, so we will
  NOT tie them"). The tiny T5 checkpoints store a separate ``lm_head`` too, so they log the same warning.

Run ``python -m blip_app.devtools.tiny DIR`` to write all four families plus ``retrieval/`` (a tiny
``Blip2ForImageTextRetrieval``) into ``DIR``.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import re
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FAMILIES: tuple[str, ...] = ("blip2-opt", "blip2-flan-t5", "instructblip-flan-t5", "instructblip-vicuna")

IMAGE_TOKEN = "<image>"

# Sizes of the tiny models. The image processor's size must equal the vision tower's image size.
_IMAGE_SIZE = 30
_PATCH_SIZE = 15
_COCO_IMAGE_SIZE = 364  # the -coco checkpoints' vision image size (the others: 224)
_COCO_PATCH_SIZE = 91  # 4 x 4 patches keep the tiny vision tower tiny
_VISION_HIDDEN = 32
_QFORMER_HIDDEN = 32
_QFORMER_POSITIONS = 64  # InstructBLIP Q-Former: the instruction limit callers can test against
_TEXT_HIDDEN = 32
_LAYERS = 2
_HEADS = 4
_WEIGHT_STD = 0.2  # modest, but large enough that a random model produces varied tokens
_T5_SENTINELS = 10  # Flan-T5 has 100 <extra_id_*> tokens; a few are enough to keep their place in the vocab
_T5_MODEL_MAX_LENGTH = 512  # as in the flan-t5 tokenizer_config.json

# The mean / std / resampling of the real BLIP processors (OPENAI_CLIP_MEAN / _STD, bicubic).
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

_CORPUS = """\
A photo of a cat sitting on a red couch next to a window.
Two dogs are playing with a ball in the green grass of the park.
A man riding a bicycle down a busy city street at night.
A woman is holding an umbrella in the rain; the sky is grey.
What is in the picture? There is a bowl of fruit on the table.
How many people are in this image? I can see 3 people and 2 children.
Describe the image in detail. The image shows a small boat on a lake with mountains behind it.
Question: what color is the car? Answer: the car is blue.
Question: where is the man standing? Answer: he is standing on the beach.
A plate with a sandwich, some chips and a glass of orange juice.
An astronaut in a white space suit stands next to the flag.
A close-up of a cup of coffee with milk, on a wooden desk.
The train is arriving at the station and people are waiting on the platform.
A young girl is reading a book under a large tree in the garden.
Is there a dog in the photo? Yes, there is a brown dog lying on the floor.
Write a short caption for this image: a kitchen with white cabinets and a stove.
A group of friends eating pizza at a restaurant, smiling and talking.
It's a sunny day; the children run along the river with their parents.
The rocket is launching into the blue sky, with smoke and fire below it.
A black and white photo of an old building with tall windows and a clock.
What does the sign say? The sign says "STOP" in big letters.
There are 10 birds flying over the sea, and 1 ship far away.
A computer screen, a keyboard and a mouse on an office desk.
Can you tell me what the weather is like? It looks cold and snowy.
A horse eating hay in a field near a fence, with hills in the background.
The food on the plate looks delicious: rice, chicken, and vegetables.
Why is the man wearing a hat? Because the sun is very bright today.
An elephant walking with her baby through the dry grass.
Who is in the picture? A person wearing a jacket, jeans and shoes.
Please answer briefly. Short answer: two.
A street with cars, buses, trucks and traffic lights at 5 pm.
The bathroom has a sink, a mirror, a toilet and a towel.
Someone is cutting a birthday cake with candles on it!
This is a painting of flowers in a vase, yellow, pink and purple.
A baseball player swings the bat during a game; the crowd watches.
Snow covers the roof of a small house in the forest.
A tennis player jumps to hit the ball on the court.
Where was this picture taken? It was probably taken in a zoo or a farm.
A cat and a dog sleep together on a bed, under a blanket.
What's that? That's a giraffe. Don't worry, it's friendly; they're tall.
A laptop, a phone and a pair of glasses are on the table by the lamp.
The kitchen is clean and bright, with a refrigerator and an oven.
A surfer rides a big wave in the ocean while people watch from the sand.
An airplane is flying above the clouds at sunset, orange and red light.
A boy kicks a soccer ball toward the goal on a sports field.
Is this a good photo? It is a little blurry, but the colors are nice.
Tell me a story about this picture. Once upon a time, there was a small cat.
"""

# Every printable ASCII character: the T5 and BERT vocabularies contain each one as a piece, so that any
# English text tokenizes without <unk> (GPT-2 is byte-level and LLaMA falls back to bytes anyway).
_ASCII = [chr(c) for c in range(33, 127)]


# --------------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------------


def _corpus_lines() -> list[str]:
    return [line for line in _CORPUS.splitlines() if line.strip()]


def _learn_bpe(word_counts: Counter[tuple[str, ...]], num_merges: int) -> list[tuple[str, str]]:
    """Learn BPE merges from words given as symbol tuples; deterministic (ties: smallest pair)."""
    words = dict(word_counts)
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if pairs[best] < 2:
            break
        merges.append(best)
        merged = best[0] + best[1]
        new_words: dict[tuple[str, ...], int] = {}
        for word, count in words.items():
            out: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            key = tuple(out)
            new_words[key] = new_words.get(key, 0) + count
        words = new_words
    return merges


def _bytes_to_unicode() -> dict[int, str]:
    """The GPT-2 byte -> printable character table (the alphabet of byte-level BPE)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _vocab_with_merges(vocab: dict[str, int], merges: Iterable[tuple[str, str]]) -> dict[str, int]:
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    return vocab


# The vocabularies depend on the corpus only: learn them once per process (tokenizer objects are built
# fresh on every call, because the processors modify the tokenizer they are given).


@functools.cache
def _opt_vocab() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    from tokenizers import pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    counts: Counter[tuple[str, ...]] = Counter()
    for line in _corpus_lines():
        for piece, _ in byte_level.pre_tokenize_str(line):
            counts[tuple(piece)] += 1
    merges = _learn_bpe(counts, 250)
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
    for ch in _bytes_to_unicode().values():
        vocab.setdefault(ch, len(vocab))
    return tuple(_vocab_with_merges(vocab, merges).items()), tuple(merges)


@functools.cache
def _llama_vocab() -> tuple[tuple[tuple[str, int], ...], tuple[tuple[str, str], ...]]:
    counts: Counter[tuple[str, ...]] = Counter()
    for line in _corpus_lines():
        for word in line.split():
            counts[tuple("▁" + word)] += 1
    merges = _learn_bpe(counts, 250)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for ch in ["▁", *_ASCII]:
        vocab.setdefault(ch, len(vocab))
    return tuple(_vocab_with_merges(vocab, merges).items()), tuple(merges)


@functools.cache
def _t5_vocab() -> tuple[tuple[str, float], ...]:
    # Pieces: words and punctuation of the corpus (a leading '▁' marks a word start), subwords learned
    # by BPE, then every printable ASCII character alone and after '▁'. Scores are log frequencies;
    # rarer pieces score lower so that Viterbi prefers whole words and falls back to characters only
    # for unseen words.
    word_counts: Counter[str] = Counter()
    for line in _corpus_lines():
        for chunk in line.split():
            for i, part in enumerate(re.findall(r"[A-Za-z0-9]+|[^A-Za-z0-9]", chunk)):
                word_counts[("▁" if i == 0 else "") + part] += 1
    total = sum(word_counts.values())
    pieces: dict[str, float] = {}
    for piece, count in sorted(word_counts.items(), key=lambda kv: (-kv[1], kv[0])):
        pieces[piece] = math.log(count / total)
    floor = math.log(1 / total)
    subwords = _learn_bpe(Counter({tuple(w): c for w, c in word_counts.items()}), 200)
    for rank, (a, b) in enumerate(subwords):
        pieces.setdefault(a + b, floor - 1.0 - rank * 1e-3)
    pieces.setdefault("▁", floor - 4.0)
    for ch in _ASCII:
        pieces.setdefault(ch, floor - 5.0)
        pieces.setdefault("▁" + ch, floor - 4.5)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(piece, score) for piece, score in pieces.items()]
    # Sentinels last, in reverse order, as in T5 (<extra_id_0> has the highest id).
    vocab += [(f"<extra_id_{i}>", 0.0) for i in range(_T5_SENTINELS - 1, -1, -1)]
    return tuple(vocab)


@functools.cache
def _bert_vocab() -> tuple[tuple[str, int], ...]:
    from tokenizers import normalizers, pre_tokenizers

    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for line in _corpus_lines():
        for piece, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line)):
            counts[piece] += 1
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}
    chars = sorted({ch.lower() for ch in _ASCII})
    for ch in chars:
        vocab.setdefault(ch, len(vocab))
    for ch in chars:
        if ch.isalnum():
            vocab.setdefault("##" + ch, len(vocab))
    for word, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
        vocab.setdefault(word, len(vocab))
    for a, b in _learn_bpe(Counter({tuple(w): c for w, c in counts.items() if w.isalnum()}), 150):
        vocab.setdefault("##" + a + b, len(vocab))
    return tuple(vocab.items())


def _build_opt_tokenizer() -> Any:
    """A GPT-2 byte-level BPE tokenizer laid out like facebook/opt's (``</s>`` = bos = eos = unk)."""
    from transformers import GPT2Tokenizer

    vocab, merges = _opt_vocab()
    return GPT2Tokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        errors="replace",
        unk_token="</s>",
        bos_token="</s>",
        eos_token="</s>",
        pad_token="<pad>",
        add_prefix_space=False,
        add_bos_token=True,
    )


def _build_llama_tokenizer(model_max_length: int) -> Any:
    """A LLaMA BPE tokenizer with byte fallback, set up as the InstructBLIP Vicuna conversion script does.

    The vocabulary is LLaMA's (``<unk>`` 0, ``<s>`` 1, ``</s>`` 2); the conversion script
    (``convert_instructblip_original_to_pytorch.py``) loads it with ``bos_token="</s>"`` and
    ``unk_token="</s>"`` and then adds ``[PAD]`` as the pad token (id 32000 in the real vocabulary, the
    32001st row that the old layouts resize for).
    """
    from transformers import LlamaTokenizer

    vocab, merges = _llama_vocab()
    tokenizer = LlamaTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        unk_token="</s>",
        bos_token="</s>",
        eos_token="</s>",
        add_bos_token=True,
        add_eos_token=False,
        legacy=False,
        truncation_side="left",
        model_max_length=model_max_length,
    )
    tokenizer.add_special_tokens({"pad_token": "[PAD]"})
    return tokenizer


def _build_t5_tokenizer() -> Any:
    """A T5 Unigram / Metaspace tokenizer laid out like flan-t5's (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2)."""
    from transformers import T5Tokenizer

    return T5Tokenizer(
        vocab=list(_t5_vocab()),
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_ids=_T5_SENTINELS,
        model_max_length=_T5_MODEL_MAX_LENGTH,
    )


def _build_bert_tokenizer(model_max_length: int) -> Any:
    """An uncased BERT WordPiece tokenizer (``[PAD]`` 0, ``[UNK]`` 1, ``[CLS]`` 2, ``[SEP]`` 3, ``[MASK]`` 4).

    ``[DEC]`` is added as bos, as in the Q-Former tokenizers of LAVIS / Salesforce (the token its text
    decoder starts with); it comes after the WordPiece vocabulary. ``truncation_side="left"`` as the
    InstructBLIP conversion script loads it, so that a long instruction keeps its end.
    """
    from transformers import BertTokenizer

    return BertTokenizer(
        vocab=dict(_bert_vocab()), do_lower_case=True, bos_token="[DEC]", model_max_length=model_max_length,
        truncation_side="left",
    )


# --------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------


def _image_processor(size: int = _IMAGE_SIZE) -> Any:
    from transformers.image_utils import PILImageResampling
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    # BlipImageProcessor needs torchvision; without it transformers falls back to this PIL backend
    # (with a warning). Both save "image_processor_type": "BlipImageProcessor", like the real ones.
    return BlipImageProcessorPil(
        size={"height": size, "width": size},
        resample=PILImageResampling.BICUBIC,
        image_mean=_CLIP_MEAN,
        image_std=_CLIP_STD,
        do_resize=True,
        do_rescale=True,
        do_normalize=True,
        do_convert_rgb=True,
    )


def _text_config(family: str, vocab_size: int, tokenizer: Any, max_positions: int) -> Any:
    from transformers import LlamaConfig, OPTConfig, T5Config

    if family == "blip2-opt":
        return OPTConfig(
            vocab_size=vocab_size,
            hidden_size=_TEXT_HIDDEN,
            word_embed_proj_dim=_TEXT_HIDDEN,
            num_hidden_layers=_LAYERS,
            num_attention_heads=_HEADS,
            ffn_dim=2 * _TEXT_HIDDEN,
            max_position_embeddings=max_positions,
            do_layer_norm_before=True,
            activation_function="relu",
            # Salesforce/blip2-opt-*: </s> (2) is BOS, and the language model stops on "\n" (50118 there),
            # not on the tokenizer's </s> (the conversion script and LAVIS set eos to the id of "\n").
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=newline_id(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=True,
        )
    if family.endswith("flan-t5"):
        # Relative positions: max_positions does not apply. decoder_start_token_id is the pad id (0) and
        # bos_token_id is </s> (1), as in the Salesforce blip2-flan-t5 configs: generate() without text
        # starts the encoder input with [<image>] * num_query_tokens + [bos].
        return T5Config(
            vocab_size=vocab_size,
            d_model=_TEXT_HIDDEN,
            d_kv=_TEXT_HIDDEN // _HEADS,
            d_ff=2 * _TEXT_HIDDEN,
            num_layers=_LAYERS,
            num_decoder_layers=_LAYERS,
            num_heads=_HEADS,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            bos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id,
        )
    if family == "instructblip-vicuna":
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=_TEXT_HIDDEN,
            intermediate_size=2 * _TEXT_HIDDEN,
            num_hidden_layers=_LAYERS,
            num_attention_heads=_HEADS,
            num_key_value_heads=_HEADS,
            max_position_embeddings=max_positions,
            rms_norm_eps=1e-6,
            # The conversion script takes the text config of decapoda-research/llama-7b-hf, whose ids do
            # not match the tokenizer: bos 0, eos 1, pad -1 (the tokenizer's eos is </s>, 2).
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=-1,
            tie_word_embeddings=False,
        )
    raise ValueError(f"Unknown family {family!r}; expected one of {', '.join(FAMILIES)}.")


def newline_id(tokenizer: Any) -> int:
    """The id of "\n" alone (LAVIS: ``opt_tokenizer("\\n", add_special_tokens=False).input_ids[0]``)."""
    return int(tokenizer("\n", add_special_tokens=False).input_ids[0])


def _padded_vocab(size: int) -> int:
    """Rows of an embedding grown past the tokenizer to a multiple of 64, as the published ones are
    (blip2-opt: 50304 rows for 50266 tokens; Flan-T5: 32128 rows for 32101 tokens)."""
    return -(-size // 64) * 64


def _shape_output_rows(model: Any, tokenizer: Any, stop_id: int | None) -> None:
    """Make the random language model's output rows behave like a trained one's where it matters.

    A trained BLIP-2 never writes padding, ``<image>`` or the unused rows past the tokenizer, and it
    ends its answers with its stop token. Random weights do neither: the rows of pad, ``<image>`` and
    the ids past ``len(tokenizer)`` are zeroed (logit 0, below the best candidates at every step), and
    the stop token's row is doubled so that answers end before the token limit some of the time. This
    is what lets a test compare blip_app with plain ``model.generate`` without handing it blip_app's
    suppressed ids.
    """
    import torch

    head = model.language_model.get_output_embeddings().weight
    silent = {tokenizer.pad_token_id, tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)} - {None}
    silent |= set(range(len(tokenizer), head.shape[0]))
    with torch.no_grad():
        for index in sorted(i for i in silent if 0 <= i < head.shape[0] and i != stop_id):
            head[index].zero_()
        if stop_id is not None:
            head[stop_id].mul_(2.0)


def _fill_weights(model: Any, seed: int, std: float = _WEIGHT_STD) -> None:
    """Overwrite every parameter deterministically: matrices ~ N(0, std), biases 0, norm scales 1."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float32) * std)
            elif name.endswith("bias"):
                param.zero_()
            else:
                param.fill_(1.0)


def _build_model(model_class: Any, config: Any, seed: int) -> Any:
    import torch

    # Construction draws from the global RNG (transformers' own init); keep the caller's RNG untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    _fill_weights(model, seed)
    model.eval()
    return model


def _untie_t5_head(model: Any, seed: int, std: float = _WEIGHT_STD) -> None:
    """Give the T5 language model its own output matrix, as Flan-T5 has (``tie_word_embeddings: false``).

    T5Config forces ``tie_word_embeddings = True`` in transformers 5.23, so the freshly built model shares
    ``lm_head`` with ``shared``. A real Flan-T5 checkpoint stores both matrices with different values, and
    ``from_pretrained`` then keeps them apart (with a warning); we store both too, so the tiny checkpoint
    loads exactly like a real one.
    """
    import torch

    language_model = model.language_model
    generator = torch.Generator().manual_seed(seed + 1)
    weight = torch.randn(language_model.lm_head.weight.shape, generator=generator, dtype=torch.float32) * std
    language_model.lm_head.weight = torch.nn.Parameter(weight)


def _generation_config(text_config: Any, tokenizer: Any, encoder_decoder: bool) -> Any:
    from transformers import GenerationConfig

    pad = text_config.pad_token_id
    kwargs: dict[str, Any] = {
        "bos_token_id": text_config.bos_token_id,
        "eos_token_id": text_config.eos_token_id,
        # transformers 5 refuses to save a negative pad id (decapoda's -1): the tokenizer's pad instead.
        "pad_token_id": pad if pad is not None and pad >= 0 else tokenizer.pad_token_id,
    }
    if encoder_decoder:
        kwargs["decoder_start_token_id"] = text_config.decoder_start_token_id
    return GenerationConfig(**kwargs)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def make_tiny_checkpoint(
    out_dir: str | Path,
    family: str,
    *,
    max_positions: int = 2048,  # the published OPT and Vicuna context
    num_query_tokens: int = 4,
    legacy: bool = False,
    coco: bool = False,
    seed: int = 0,
) -> Path:
    """Write one tiny checkpoint of `family` into out_dir (created); return out_dir.

    ``coco=True`` (BLIP-2 only) writes it like the -coco caption checkpoints, which were converted
    with vision ``image_size`` 364 (the others: 224), the sign by which a local folder is recognised.
    """
    import copy

    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipProcessor,
        InstructBlipQFormerConfig,
        InstructBlipVisionConfig,
    )

    if family not in FAMILIES:
        raise ValueError(f"Unknown family {family!r}; expected one of {', '.join(FAMILIES)}.")
    if coco and family.startswith("instructblip"):
        raise ValueError("There are no InstructBLIP -coco checkpoints.")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    instruct = family.startswith("instructblip")

    if family == "blip2-opt":
        tokenizer = _build_opt_tokenizer()
    elif family == "instructblip-vicuna":
        tokenizer = _build_llama_tokenizer(max_positions)
    else:
        tokenizer = _build_t5_tokenizer()
    qformer_tokenizer = _build_bert_tokenizer(_QFORMER_POSITIONS) if instruct else None
    image_size, patch_size = (_COCO_IMAGE_SIZE, _COCO_PATCH_SIZE) if coco else (_IMAGE_SIZE, _PATCH_SIZE)
    image_processor = _image_processor(image_size)

    # The processor adds <image> to the tokenizer it is given (if it has no `image_token`): a legacy
    # checkpoint must be saved from an untouched copy.
    plain_tokenizer = copy.deepcopy(tokenizer)
    if instruct:
        processor = InstructBlipProcessor(
            image_processor, tokenizer, qformer_tokenizer, num_query_tokens=None if legacy else num_query_tokens
        )
    else:
        processor = Blip2Processor(image_processor, tokenizer, num_query_tokens=None if legacy else num_query_tokens)
    image_token_id = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if legacy:
        vocab_size = len(plain_tokenizer)
    elif family == "instructblip-vicuna":
        vocab_size = len(processor.tokenizer)
    else:  # OPT and T5 embeddings have unused rows past the tokenizer, as the published ones
        vocab_size = _padded_vocab(len(processor.tokenizer) + 1)

    text_config = _text_config(family, vocab_size, plain_tokenizer, max_positions)
    vision_cls, qformer_cls, config_cls = (
        (InstructBlipVisionConfig, InstructBlipQFormerConfig, InstructBlipConfig)
        if instruct
        else (Blip2VisionConfig, Blip2QFormerConfig, Blip2Config)
    )
    vision_config = vision_cls(
        hidden_size=_VISION_HIDDEN,
        intermediate_size=2 * _VISION_HIDDEN,
        num_hidden_layers=_LAYERS,
        num_attention_heads=_HEADS,
        image_size=image_size,
        patch_size=patch_size,
    )
    qformer_kwargs: dict[str, Any] = {
        "hidden_size": _QFORMER_HIDDEN,
        "num_hidden_layers": _LAYERS,
        "num_attention_heads": _HEADS,
        "intermediate_size": 2 * _QFORMER_HIDDEN,
        "cross_attention_frequency": 1,
        "encoder_hidden_size": _VISION_HIDDEN,
        "max_position_embeddings": _QFORMER_POSITIONS,
    }
    if instruct:
        qformer_kwargs["vocab_size"] = len(qformer_tokenizer)
        qformer_kwargs["pad_token_id"] = qformer_tokenizer.pad_token_id
    qformer_config = qformer_cls(**qformer_kwargs)
    config_kwargs: dict[str, Any] = {
        "vision_config": vision_config,
        "qformer_config": qformer_config,
        "text_config": text_config,
        "num_query_tokens": num_query_tokens,
    }
    if not legacy:
        config_kwargs["image_token_index"] = image_token_id
    config = config_cls(**config_kwargs)

    model_class = InstructBlipForConditionalGeneration if instruct else Blip2ForConditionalGeneration
    model = _build_model(model_class, config, seed)
    if not config.use_decoder_only_language_model:
        _untie_t5_head(model, seed)
    _shape_output_rows(model, processor.tokenizer, text_config.eos_token_id)
    model.generation_config = _generation_config(text_config, plain_tokenizer,
                                                 encoder_decoder=family.endswith("flan-t5"))
    model.save_pretrained(out)

    if legacy:
        _save_legacy_processor(out, processor, plain_tokenizer)
    else:
        processor.save_pretrained(out)
    logger.info(
        "wrote tiny %s checkpoint%s to %s (%d language-model tokens, %d parameters)",
        family,
        " (legacy layout)" if legacy else "",
        out,
        vocab_size,
        sum(p.numel() for p in model.parameters()),
    )
    return out


def _save_legacy_processor(out: Path, processor: Any, plain_tokenizer: Any) -> None:
    """Write the pre-4.46 processor layout: image processor in preprocessor_config.json, no <image>."""
    processor_class = type(processor).__name__
    processor.image_processor.save_pretrained(out)
    preprocessor_file = out / "preprocessor_config.json"
    preprocessor = json.loads(preprocessor_file.read_text(encoding="utf-8"))
    preprocessor["processor_class"] = processor_class  # how AutoProcessor finds the class in old repositories
    _write_json(preprocessor_file, preprocessor)
    plain_tokenizer._set_processor_class(processor_class)
    plain_tokenizer.save_pretrained(out)
    qformer_tokenizer = getattr(processor, "qformer_tokenizer", None)
    if qformer_tokenizer is not None:
        qformer_tokenizer._set_processor_class(processor_class)
        qformer_tokenizer.save_pretrained(out / "qformer_tokenizer")


def make_tiny_checkpoints(out_dir: str | Path, *, seed: int = 0) -> dict[str, Path]:
    """Write all four families into out_dir/<family>; return {family: path}."""
    out = Path(out_dir)
    return {family: make_tiny_checkpoint(out / family, family, seed=seed) for family in FAMILIES}


def make_tiny_retrieval_checkpoint(out_dir: str | Path, *, seed: int = 0, num_query_tokens: int = 4) -> Path:
    """Write a tiny ``Blip2ForImageTextRetrieval`` (like Salesforce/blip2-itm-vit-g) into out_dir; return it.

    The Q-Former reads the text itself (``use_qformer_text_input``) with a BERT WordPiece tokenizer; the
    processor is a ``Blip2Processor`` with ``num_query_tokens`` and ``config.image_token_index`` set, so
    ``model(**processor(images=..., text=...), use_image_text_matching_head=True).logits_per_image`` gives
    the ITM logits (``[no match, match]``) and ``use_image_text_matching_head=False`` the ITC similarity.
    The language-model ``text_config`` that every ``Blip2Config`` carries is the default one: this model
    has no language model and never builds it.
    """
    from transformers import (
        Blip2Config,
        Blip2ForImageTextRetrieval,
        Blip2Processor,
        Blip2QFormerConfig,
        Blip2VisionConfig,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _build_bert_tokenizer(_QFORMER_POSITIONS)
    processor = Blip2Processor(_image_processor(), tokenizer, num_query_tokens=num_query_tokens)
    vision_config = Blip2VisionConfig(
        hidden_size=_VISION_HIDDEN,
        intermediate_size=2 * _VISION_HIDDEN,
        num_hidden_layers=_LAYERS,
        num_attention_heads=_HEADS,
        image_size=_IMAGE_SIZE,
        patch_size=_PATCH_SIZE,
    )
    qformer_config = Blip2QFormerConfig(
        vocab_size=len(processor.tokenizer),
        hidden_size=_QFORMER_HIDDEN,
        num_hidden_layers=_LAYERS,
        num_attention_heads=_HEADS,
        intermediate_size=2 * _QFORMER_HIDDEN,
        cross_attention_frequency=1,
        encoder_hidden_size=_VISION_HIDDEN,
        max_position_embeddings=_QFORMER_POSITIONS,
        pad_token_id=processor.tokenizer.pad_token_id,
        use_qformer_text_input=True,
    )
    config = Blip2Config(
        vision_config=vision_config,
        qformer_config=qformer_config,
        num_query_tokens=num_query_tokens,
        image_text_hidden_size=16,
        image_token_index=processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
    )
    model = _build_model(Blip2ForImageTextRetrieval, config, seed)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    logger.info(
        "wrote tiny blip2 image-text retrieval checkpoint to %s (%d parameters)",
        out,
        sum(p.numel() for p in model.parameters()),
    )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blip_app.devtools.tiny", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="folder to write <family>/ checkpoints into")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # one line per family is enough
    start = time.perf_counter()
    make_tiny_checkpoints(args.out_dir, seed=args.seed)
    make_tiny_retrieval_checkpoint(args.out_dir / "retrieval", seed=args.seed)
    logger.info("done in %.1f s", time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
