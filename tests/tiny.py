"""A tiny, randomly initialised Llama with a real byte-level BPE tokenizer, built locally.

Tests and quick experiments need a real mlx-lm model directory (config.json, safetensors,
tokenizer.json, tokenizer_config.json with a chat template) that loads with ``mlx_lm.load`` but
costs milliseconds per step on a CPU. The tokenizer is trained with the ``tokenizers`` library on
a deterministic synthetic corpus, so the same arguments always give the same files.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|reserved_0|>", "<|reserved_1|>"]

_WORDS = (
    "the a an of to in is was and or but not what why how when where who which capital city river "
    "number answer question think step because therefore so first then next finally add subtract "
    "multiply divide sum product equal more less one two three four five six seven eight nine ten "
    "France Paris Spain Madrid Italy Rome water fire earth air light sound tree leaf bird fish cat "
    "dog house road car train book word letter explain define advice help good bad small large "
    "hot cold fast slow young old day night year time people world life hand part place case "
    "point week company system program work government fact mean reason result change example "
    "{ } ( ) [ ] = + - * / : ; , . ? ! ' \" def return print import x y z 0 1 2 3 4 5 6 7 8 9 é ü 中 文"
).split()


@dataclass
class TinySpec:
    """Shape of the tiny model; the defaults keep a 3-step NRT run to a few seconds on 2 cores."""

    vocab_size: int = 512
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    add_bos: bool = False
    chat_template: bool = True
    tie_word_embeddings: bool = False
    seed: int = 0


def _corpus(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = rng.choices(_WORDS, k=rng.randint(4, 16))
        lines.append(" ".join(words))
    return lines


def build_tokenizer(out_dir: Path, spec: TinySpec) -> int:
    """Train a byte-level BPE tokenizer and write tokenizer.json + tokenizer_config.json.

    Returns the vocabulary size (special tokens included).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = list(SPECIAL_TOKENS)
    if spec.add_bos:
        specials.append("<s>")
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(4000, spec.seed), trainer=trainer)
    if spec.add_bos:
        bos_id = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save(str(out_dir / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": 2048,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "bos_token": "<s>" if spec.add_bos else None,
        "add_bos_token": spec.add_bos,
        "clean_up_tokenization_spaces": False,
    }
    if spec.chat_template:
        config["chat_template"] = CHATML_TEMPLATE
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return tok.get_vocab_size()


def build_tiny_model(out_dir: str | Path, spec: TinySpec | None = None) -> Path:
    """Write a tiny random Llama model directory that ``mlx_lm.load`` reads. Returns its path."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    spec = spec or TinySpec()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = build_tokenizer(out, spec)
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.num_layers,
        "intermediate_size": spec.intermediate_size,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab,
        "rope_theta": 10000.0,
        "max_position_embeddings": 2048,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "eos_token_id": SPECIAL_TOKENS.index("<|im_end|>"),
        "torch_dtype": "float32",
    }
    mx.random.seed(spec.seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
