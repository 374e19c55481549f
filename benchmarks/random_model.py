"""Save a random-weight causal LM of a real shape, with a real tokenizer, whose sampled completions end at varied
lengths.

For checks on machines the embedded model cannot travel to (timing and memory depend on shapes, not weights). A
random model almost never samples EOS, so every completion would run to the cap; the EOS row of the output layer is
redrawn larger (`--eos-scale`) so that EOS logits fluctuate and completions stop at scattered, long-tailed lengths.

    python benchmarks/random_model.py --tokenizer ~/.cache/rl_lenbalance/smollm2-135m-instruct-q4_1-f32 --out /tmp/rand
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

SHAPES = {  # a shape name -> config overrides on top of the tokenizer folder's config.json
    "smollm2-135m": {},
    "qwen2.5-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         intermediate_size=4864, head_dim=64),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="A local model folder with config.json and the tokenizer files.")
    p.add_argument("--out", required=True)
    p.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    p.add_argument("--eos-scale", type=float, default=0.9,
                   help="Std of the redrawn EOS output row (0.9: SmolLM2 shape, lengths spread over 0-128).")
    args = p.parse_args()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    config = AutoConfig.from_pretrained(args.tokenizer, **SHAPES[args.shape], tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.lm_head.weight[tokenizer.eos_token_id].normal_(0.0, args.eos_scale)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)


if __name__ == "__main__":
    main()
