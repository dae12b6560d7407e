"""Random-weight BLIP-2 / InstructBLIP checkpoints at a catalog entry's real size, for benchmarks.

Speed and memory depend on a model's shapes, not on its weights. When no real checkpoint is at hand
(no Hugging Face Hub access), :func:`build_realsize` writes a checkpoint with the published sizes of a
catalog entry (ViT-g/14 vision encoder, BERT-base sized Q-Former, the language model of
``entry.architecture``) and random bfloat16 weights, with ``save_pretrained``, so that it loads through
exactly the path a real checkpoint takes (``AutoModelForImageTextToText.from_pretrained`` of a folder of
safetensors, memory-mapped).

How it is built quickly (seconds, not the minutes a random initialisation of 3.7 B parameters takes):

1. the model is constructed with parameters on the ``meta`` device (nothing allocated, nothing
   initialised) and buffers on the CPU, so computed buffers (for example LLaMA's rotary frequencies)
   keep their real values;
2. each parameter is materialised in bfloat16 and filled deterministically (a generator seeded from the
   seed and the parameter's name): matrices uniform with standard deviation 0.02, biases 0, norm scales 1;
   tied parameters (OPT's ``lm_head`` and embeddings) stay tied, Flan-T5's ``lm_head`` is untied as in the
   real checkpoints;
3. ``save_pretrained`` writes it, with a processor whose tokenizer is the offline one of
   :mod:`blip_app.devtools.tiny`, padded with filler tokens (" w123") up to the real embedding size, so that every
   id the model can produce decodes to some text (streaming and time-to-first-token need that), and whose
   image processor has the real 224 px size.

The folder is cached under ``~/.cache/blip_app/realsize/<name>`` (``BLIP_APP_REALSIZE_DIR`` or ``root=``
overrides the parent folder) and reused while its ``realsize.json`` matches the entry, sizes, seed and
:data:`FORMAT_VERSION`. A folder is written under a temporary name and renamed when complete, so an
interrupted build is never reused.

``python -m blip_app.devtools.realsize blip2-opt-2.7b`` builds (or finds) one and prints its folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import time
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from blip_app.core.catalog import Architecture, CatalogEntry, Family, LanguageModel, find_entry

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: filler tokens a BPE tokenizer gives back (_pad_vocab)
MARKER = "realsize.json"
WEIGHT_STD = 0.02

# Tokens the real tokenizers have fewer than their embedding matrix: OPT's tokenizer holds 50265 of
# 50272 rows, Flan-T5's 32100 of 32128; Vicuna's 32000 rows, one of them made the image token here.
_TOKENIZER_SLACK = {LanguageModel.OPT: 7, LanguageModel.FLAN_T5: 28, LanguageModel.VICUNA: 1}


@dataclass(frozen=True)
class Sizes:
    """Every size a BLIP-2 / InstructBLIP checkpoint is built with (the defaults are the published ones)."""

    text: Architecture
    text_positions: int = 2048  # decoder-only language models
    vision_hidden: int = 1408  # ViT-g/14
    vision_layers: int = 39
    vision_heads: int = 16
    vision_mlp: int = 6144
    image_size: int = 224
    patch_size: int = 14
    qformer_hidden: int = 768  # BERT-base sized Q-Former
    qformer_layers: int = 12
    qformer_heads: int = 12
    qformer_mlp: int = 3072
    qformer_vocab: int = 30523  # bert-base-uncased + [DEC]
    qformer_positions: int = 512
    cross_attention_frequency: int = 2
    num_query_tokens: int = 32

    def scaled(self, factor: float) -> Sizes:
        """The same architecture with widths and depths multiplied by ``factor`` (vocabularies kept).

        For tests: ``scale=1/64`` gives a model of a few million parameters that goes through every
        step of the real-size build (including the padded tokenizer at the real vocabulary size).
        """
        if factor == 1:
            return self

        def width(value: int, heads: int) -> int:
            head_dim = max(4, round(value / heads * factor))
            return head_dim * heads

        def heads_of(value: int) -> int:
            return max(2, round(value * math.sqrt(factor)))

        def depth(value: int) -> int:
            return max(1, round(value * factor))

        text_heads = heads_of(self.text.heads)
        vision_heads = heads_of(self.vision_heads)
        qformer_heads = heads_of(self.qformer_heads)
        return replace(
            self,
            text=Architecture(
                hidden=width(self.text.hidden, text_heads), layers=max(2, depth(self.text.layers)),
                heads=text_heads, mlp=max(8, round(self.text.mlp * factor)), vocab=self.text.vocab,
            ),
            vision_hidden=width(self.vision_hidden, vision_heads), vision_layers=depth(self.vision_layers),
            vision_heads=vision_heads, vision_mlp=max(8, round(self.vision_mlp * factor)),
            image_size=max(2 * self.patch_size, round(self.image_size * math.sqrt(factor) / self.patch_size)
                           * self.patch_size),
            qformer_hidden=width(self.qformer_hidden, qformer_heads), qformer_layers=max(2, depth(self.qformer_layers)),
            qformer_heads=qformer_heads, qformer_mlp=max(8, round(self.qformer_mlp * factor)),
            num_query_tokens=max(2, round(self.num_query_tokens * math.sqrt(factor))),
        )


def real_sizes(entry: CatalogEntry) -> Sizes:
    """The published sizes of a catalog entry."""
    return Sizes(text=entry.architecture)


def default_root() -> Path:
    """Where built checkpoints are cached: ``$BLIP_APP_REALSIZE_DIR`` or ``~/.cache/blip_app/realsize``."""
    env = os.environ.get("BLIP_APP_REALSIZE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "blip_app" / "realsize"


def _entry(name_or_entry: str | CatalogEntry) -> CatalogEntry:
    if isinstance(name_or_entry, CatalogEntry):
        return name_or_entry
    entry = find_entry(name_or_entry)
    if entry is None:
        raise ValueError(f"{name_or_entry!r} is not a catalog name; real-size checkpoints are built from the catalog.")
    return entry


def _marker(entry: CatalogEntry, sizes: Sizes, seed: int) -> dict[str, Any]:
    return {"format": FORMAT_VERSION, "name": entry.name, "hub_id": entry.hub_id, "seed": seed,
            "dtype": "bfloat16", "sizes": asdict(sizes)}


def _folder_name(entry: CatalogEntry, sizes: Sizes, seed: int) -> str:
    if sizes == real_sizes(entry) and seed == 0:
        return entry.name
    digest = hashlib.sha256(json.dumps(_marker(entry, sizes, seed), sort_keys=True).encode()).hexdigest()[:10]
    return f"{entry.name}-{digest}"


def checkpoint_dir(name_or_entry: str | CatalogEntry, *, root: str | Path | None = None,
                   sizes: Sizes | None = None, scale: float = 1.0, seed: int = 0) -> Path:
    """The folder :func:`build_realsize` uses for these arguments when no ``out_dir`` is given."""
    entry = _entry(name_or_entry)
    sizes = (sizes or real_sizes(entry)).scaled(scale)
    base = Path(root).expanduser() if root is not None else default_root()
    return base / _folder_name(entry, sizes, seed)


def is_built(folder: str | Path, name_or_entry: str | CatalogEntry, *, sizes: Sizes | None = None,
             scale: float = 1.0, seed: int = 0) -> bool:
    """Whether ``folder`` holds a complete checkpoint built with exactly these arguments."""
    entry = _entry(name_or_entry)
    sizes = (sizes or real_sizes(entry)).scaled(scale)
    try:
        saved = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    expected = json.loads(json.dumps(_marker(entry, sizes, seed)))
    return saved == expected and any(Path(folder).glob("*.safetensors"))


def build_realsize(
    name_or_entry: str | CatalogEntry,
    out_dir: str | Path | None = None,
    *,
    root: str | Path | None = None,
    sizes: Sizes | None = None,
    scale: float = 1.0,
    seed: int = 0,
    force: bool = False,
) -> Path:
    """Build (or reuse) a random-weight checkpoint of a catalog entry at its real size; return its folder.

    ``out_dir`` names the folder itself; otherwise it is ``<root>/<name>`` (``<root>/<name>-<hash>``
    when ``sizes``, ``scale`` or ``seed`` differ from the defaults). ``sizes`` / ``scale`` shrink the
    architecture (tests). An existing complete folder built with the same arguments is reused unless
    ``force``.
    """
    entry = _entry(name_or_entry)
    sizes = (sizes or real_sizes(entry)).scaled(scale)
    out = Path(out_dir).expanduser() if out_dir is not None else checkpoint_dir(entry, root=root, sizes=sizes,
                                                                                 seed=seed)
    if not force and is_built(out, entry, sizes=sizes, seed=seed):
        log.info("reusing the real-size %s checkpoint in %s", entry.name, out)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    started = time.perf_counter()
    try:
        _write_checkpoint(tmp, entry, sizes, seed)
        (tmp / MARKER).write_text(json.dumps(_marker(entry, sizes, seed), indent=2, sort_keys=True) + "\n",
                                  encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("built the real-size %s checkpoint in %s (%.0f s)", entry.name, out, time.perf_counter() - started)
    return out


# --------------------------------------------------------------------------------------------------
# Tokenizers and processor


_FILLER_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _pad_vocab(vocab: dict[str, int], merges: list[tuple[str, str]], target: int, space: str
               ) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Fill the vocabulary to ``target`` with words a real BPE tokenizer would give back unchanged.

    A real checkpoint's tokenizer encodes the text of an answer it generated back to (nearly) the same
    ids, so a conversation's history costs about as many tokens as were generated. Filler tokens that no
    merge reaches (what this module had) decode to text that re-encodes 4-8 times longer, which made
    every chat turn's history and prefill several times what a real model's are. The fillers are words
    of lower-case letters after ``space`` ("Ġ" for OPT's byte-level BPE, "▁" for Llama's), added as a
    trie (every prefix is a token too), each reached by the merge (its prefix, its last letter). These
    merges rank before the corpus's, so a word of up to four letters always ends as one token.
    """
    vocab, ours, seen = dict(vocab), [], set()
    level = [space]
    while len(vocab) < target and level:
        following = []
        for prefix in level:
            for letter in _FILLER_LETTERS:
                if len(vocab) >= target:
                    break
                word = prefix + letter
                ours.append((prefix, letter))
                seen.add((prefix, letter))
                vocab.setdefault(word, len(vocab))
                following.append(word)
        level = following
    return vocab, ours + [m for m in merges if tuple(m) not in seen]


def _language_tokenizer(language_model: LanguageModel, vocab_size: int, positions: int) -> Any:
    """The offline tokenizer of blip_app.devtools.tiny for this language model, padded so it fills the embeddings.

    The processor adds ``<image>`` after the padded vocabulary, so its id is below ``vocab_size``.
    """
    from blip_app.devtools import tiny

    target = vocab_size - _TOKENIZER_SLACK[language_model]
    if language_model is LanguageModel.OPT:
        from transformers import GPT2Tokenizer

        vocab, merges = tiny._opt_vocab()
        padded, merges = _pad_vocab(dict(vocab), list(merges), target, "\u0120")  # "Ġ": a word after a space
        return GPT2Tokenizer(vocab=padded, merges=merges, errors="replace", unk_token="</s>",
                             bos_token="</s>", eos_token="</s>", pad_token="<pad>", add_prefix_space=False,
                             add_bos_token=True)
    if language_model is LanguageModel.VICUNA:
        from transformers import LlamaTokenizer

        vocab, merges = tiny._llama_vocab()
        padded, merges = _pad_vocab(dict(vocab), list(merges), target, "\u2581")
        return LlamaTokenizer(vocab=padded, merges=merges, unk_token="<unk>", bos_token="<s>",
                              eos_token="</s>", pad_token="<unk>", add_bos_token=True, add_eos_token=False,
                              legacy=False, model_max_length=positions)
    from transformers import T5Tokenizer

    pieces = list(tiny._t5_vocab())
    sentinels = [p for p in pieces if p[0].startswith("<extra_id_")]
    base = [p for p in pieces if not p[0].startswith("<extra_id_")]
    known = {p[0] for p in base}
    i = 0
    while len(base) + len(sentinels) < target:
        token = f"\u2581w{i}"
        i += 1
        if token not in known:
            base.append((token, -30.0))
    return T5Tokenizer(vocab=base + sentinels, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                       extra_ids=len(sentinels), model_max_length=tiny._T5_MODEL_MAX_LENGTH)


def _image_processor(image_size: int) -> Any:
    from transformers.image_utils import PILImageResampling
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    from blip_app.devtools import tiny

    return BlipImageProcessorPil(size={"height": image_size, "width": image_size},
                                 resample=PILImageResampling.BICUBIC, image_mean=tiny._CLIP_MEAN,
                                 image_std=tiny._CLIP_STD, do_resize=True, do_rescale=True, do_normalize=True,
                                 do_convert_rgb=True)


def build_processor(entry: CatalogEntry, sizes: Sizes) -> Any:
    """A working processor for the checkpoint: padded language tokenizer, real image size, Q-Former tokenizer."""
    from transformers import Blip2Processor, InstructBlipProcessor

    from blip_app.devtools import tiny

    tokenizer = _language_tokenizer(entry.language_model, sizes.text.vocab, sizes.text_positions)
    image_processor = _image_processor(sizes.image_size)
    if entry.family is Family.INSTRUCTBLIP:
        qformer_tokenizer = tiny._build_bert_tokenizer(sizes.qformer_positions)
        return InstructBlipProcessor(image_processor, tokenizer, qformer_tokenizer,
                                     num_query_tokens=sizes.num_query_tokens)
    return Blip2Processor(image_processor, tokenizer, num_query_tokens=sizes.num_query_tokens)


# --------------------------------------------------------------------------------------------------
# Model


def build_config(entry: CatalogEntry, sizes: Sizes, tokenizer: Any) -> Any:
    """The model config of a catalog entry at ``sizes`` (token ids from ``tokenizer``)."""
    from transformers import (
        Blip2Config,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        InstructBlipConfig,
        InstructBlipQFormerConfig,
        InstructBlipVisionConfig,
        LlamaConfig,
        OPTConfig,
        T5Config,
    )

    from blip_app.devtools import tiny

    arch = sizes.text
    if entry.language_model is LanguageModel.OPT:
        text = OPTConfig(vocab_size=arch.vocab, hidden_size=arch.hidden, word_embed_proj_dim=arch.hidden,
                         num_hidden_layers=arch.layers, num_attention_heads=arch.heads, ffn_dim=arch.mlp,
                         max_position_embeddings=sizes.text_positions, do_layer_norm_before=True,
                         activation_function="relu", bos_token_id=2, eos_token_id=tiny.newline_id(tokenizer),
                         pad_token_id=1, tie_word_embeddings=True)  # stops on "\n", as the published ones
    elif entry.language_model is LanguageModel.VICUNA:
        text = LlamaConfig(vocab_size=arch.vocab, hidden_size=arch.hidden, intermediate_size=arch.mlp,
                           num_hidden_layers=arch.layers, num_attention_heads=arch.heads,
                           num_key_value_heads=arch.heads, max_position_embeddings=sizes.text_positions,
                           rms_norm_eps=1e-6, bos_token_id=tokenizer.bos_token_id,
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                           tie_word_embeddings=False)
    else:
        text = T5Config(vocab_size=arch.vocab, d_model=arch.hidden, d_kv=arch.hidden // arch.heads, d_ff=arch.mlp,
                        num_layers=arch.layers, num_decoder_layers=arch.layers, num_heads=arch.heads,
                        feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                        bos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    instruct = entry.family is Family.INSTRUCTBLIP
    vision_cls, qformer_cls, config_cls = (
        (InstructBlipVisionConfig, InstructBlipQFormerConfig, InstructBlipConfig) if instruct
        else (Blip2VisionConfig, Blip2QFormerConfig, Blip2Config))
    vision = vision_cls(hidden_size=sizes.vision_hidden, intermediate_size=sizes.vision_mlp,
                        num_hidden_layers=sizes.vision_layers, num_attention_heads=sizes.vision_heads,
                        image_size=sizes.image_size, patch_size=sizes.patch_size, layer_norm_eps=1e-6,
                        qkv_bias=True)
    qformer = qformer_cls(vocab_size=sizes.qformer_vocab, hidden_size=sizes.qformer_hidden,
                          num_hidden_layers=sizes.qformer_layers, num_attention_heads=sizes.qformer_heads,
                          intermediate_size=sizes.qformer_mlp,
                          cross_attention_frequency=sizes.cross_attention_frequency,
                          encoder_hidden_size=sizes.vision_hidden, max_position_embeddings=sizes.qformer_positions)
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    if image_token_id is None or image_token_id >= arch.vocab:
        raise ValueError(f"The <image> token ({image_token_id}) does not fit the vocabulary of {arch.vocab}.")
    config = config_cls(vision_config=vision, qformer_config=qformer, text_config=text,
                        num_query_tokens=sizes.num_query_tokens, image_token_index=image_token_id)
    config.dtype = "bfloat16"
    return config


def materialize(model: Any, seed: int, *, std: float = WEIGHT_STD) -> None:
    """Give every meta parameter bfloat16 storage filled deterministically; tied parameters stay tied.

    Matrices (and embeddings, query tokens, position tables) are uniform with standard deviation ``std``
    (uniform fills 3 times faster than normal here), biases 0, other vectors (norm scales) 1. Each
    parameter's generator is seeded from ``seed`` and its name, so the values do not depend on order.
    """
    import torch

    bound = std * math.sqrt(3.0)
    done: dict[int, torch.nn.Parameter] = {}
    with torch.no_grad():
        for full_name, param in list(model.named_parameters(remove_duplicate=False)):
            module_name, _, attr = full_name.rpartition(".")
            module = model.get_submodule(module_name) if module_name else model
            new = done.get(id(param))
            if new is None:
                data = torch.empty(param.shape, dtype=torch.bfloat16, device="cpu")
                if param.dim() >= 2:
                    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(full_name.encode()))
                    data.uniform_(-bound, bound, generator=generator)
                elif attr == "bias" or full_name.endswith("bias"):
                    data.zero_()
                else:
                    data.fill_(1.0)
                new = torch.nn.Parameter(data, requires_grad=False)
                done[id(param)] = new
            module._parameters[attr] = new


def build_model(entry: CatalogEntry, sizes: Sizes, tokenizer: Any, seed: int = 0) -> Any:
    """The model with random bfloat16 weights, built on the meta device and then materialised."""
    import torch
    from accelerate import init_empty_weights
    from transformers import Blip2ForConditionalGeneration, InstructBlipForConditionalGeneration

    config = build_config(entry, sizes, tokenizer)
    model_class = (InstructBlipForConditionalGeneration if entry.family is Family.INSTRUCTBLIP
                   else Blip2ForConditionalGeneration)
    with init_empty_weights(include_buffers=False):
        model = model_class(config)
    if config.text_config.tie_word_embeddings:
        model.tie_weights()  # on meta: ties lm_head to the embeddings before they get storage
    materialize(model, seed)
    if not config.use_decoder_only_language_model:
        # Flan-T5 stores its own lm_head (T5Config ties by default in transformers 5; see blip_app.devtools.tiny).
        head = model.language_model.lm_head
        generator = torch.Generator().manual_seed(seed * 1_000_003 + 17)
        bound = WEIGHT_STD * math.sqrt(3.0)
        head.weight = torch.nn.Parameter(
            torch.empty(head.weight.shape, dtype=torch.bfloat16).uniform_(-bound, bound, generator=generator),
            requires_grad=False)
    leftover = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    leftover += [n for n, b in model.named_buffers() if b.device.type == "meta"]
    if leftover:
        raise RuntimeError(f"Parameters left on the meta device: {leftover[:5]}")
    model.eval()
    return model


def _write_checkpoint(out: Path, entry: CatalogEntry, sizes: Sizes, seed: int) -> None:
    from blip_app.devtools import tiny

    out.mkdir(parents=True, exist_ok=True)
    processor = build_processor(entry, sizes)
    started = time.perf_counter()
    model = build_model(entry, sizes, processor.tokenizer, seed)
    built = time.perf_counter()
    model.generation_config = tiny._generation_config(
        model.config.text_config, processor.tokenizer,
        encoder_decoder=not model.config.use_decoder_only_language_model)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    log.info("%s: %.2f B parameters, built in %.1f s, written in %.1f s", entry.name, params / 1e9,
             built - started, time.perf_counter() - built)


def parameter_count(folder: str | Path) -> int:
    """Parameters stored in a checkpoint folder's safetensors files (tied ones once)."""
    from safetensors import safe_open

    total = 0
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                total += math.prod(handle.get_slice(key).get_shape())
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blip_app.devtools.realsize", description=__doc__.splitlines()[0])
    parser.add_argument("name", help="catalog name, e.g. blip2-opt-2.7b")
    parser.add_argument("--out", type=Path, default=None, help="folder to write (default: the cache)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--force", action="store_true", help="rebuild even if a matching folder exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(build_realsize(args.name, args.out, seed=args.seed, force=args.force))
    return 0


__all__ = ["FORMAT_VERSION", "Sizes", "build_config", "build_model", "build_processor", "build_realsize",
           "checkpoint_dir", "default_root", "is_built", "materialize", "parameter_count", "real_sizes"]

if __name__ == "__main__":
    raise SystemExit(main())
