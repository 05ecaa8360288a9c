"""The model card (README.md) of an exported folder: what the model is, its test figures, how to
load it, its recipe and the hashes of the data it was trained on."""

from __future__ import annotations

import json

from tdlm.config import to_toml

FIGURE_SPLITS = ("valid", "test")


def figures_table(summary: dict | None) -> str:
    """The run's final figures from summary.json, each named for what it is: a NELBO (an upper
    bound on the NLL, so the perplexity and bits per byte are bounds too) or an exact NLL."""
    rows = [(split, summary[split]) for split in FIGURE_SPLITS if isinstance((summary or {}).get(split), dict)]
    if not rows:
        return ("No final figures: the run did not finish (no summary.json figures). Score it with "
                "`tdlm eval FOLDER --split test`.\n")
    bound = any(r.get("is_bound") for _, r in rows)
    lines = ["| split | figure | nats/token | ± stderr | perplexity | bits/byte | tokens |",
             "|---|---|---|---|---|---|---|"]
    for split, r in rows:
        kind, le = ("NELBO (upper bound)", "≤ ") if r.get("is_bound") else ("NLL (exact)", "")
        lines.append(f"| {split} | {kind} | {r['nll_per_token']:.4f} | {r['stderr']:.4f} | {le}{r['ppl']:.2f} "
                     f"| {le}{r['bits_per_byte']:.4f} | {r['tokens']:,} |")
    if bound:
        first = rows[-1][1]
        note = (f"The diffusion figures are the NELBO, an upper bound on the negative log-likelihood (the "
                f"perplexity and bits per byte are upper bounds too), estimated with {first.get('t_samples')} "
                f"t-samples per sequence (t drawn under the {first.get('estimator', 'recipe')} schedule); they are not comparable "
                "as equals with an autoregressive model's exact NLL.")
    else:
        note = "The autoregressive figures are the exact negative log-likelihood of every token."
    return "\n".join(lines) + "\n\n" + note + "\n"


def data_section(data: dict | None) -> str:
    if not data:
        return "The run has no data record (data.json): it was trained before tdlm kept one.\n"
    tok = data.get("tokenizer", {})
    lines = [f"Tokenizer `{tok.get('name')}` ({tok.get('size')} tokens, vocabulary sha256 "
             f"`{tok.get('vocab_sha256')}`, tokenizers {tok.get('tokenizers')}); format `{data.get('format')}`.", "",
             "| split | tokens | text / shards sha256 | token ids sha256 |", "|---|---|---|---|"]
    for split, entry in data.get("splits", {}).items():
        content = entry.get("text_sha256") or entry.get("shards_sha256") or ""
        lines.append(f"| {split} | {entry.get('tokens', '')} | `{content}` | `{entry.get('tokens_sha256', '')}` |")
    return "\n".join(lines) + "\n"


def model_card(*, name: str, recipe: dict, causal: bool, vocab, parameters: int, checkpoint: dict,
               summary: dict | None, data: dict | None) -> str:
    model, seq_len = recipe["model"], recipe["data"]["seq_len"]
    kind = "autoregressive" if causal else "masked-diffusion"
    auto = "AutoModelForCausalLM" if causal else "AutoModelForMaskedLM"
    tag = "text-generation" if causal else "fill-mask"
    header = {"library_name": "transformers", "pipeline_tag": tag, "tags": ["tdlm", kind, "custom_code"]}
    use_logits = ("ids = tokenizer(\"The cat\", return_tensors=\"pt\").input_ids\n"
                  "ids = torch.cat([torch.tensor([[tokenizer.bos_token_id]]), ids], 1)  # tdlm's AR models start "
                  "from end-of-text\nlogits = model(ids).logits  # [1, N, V]: position i predicts token i + 1"
                  if causal else
                  "ids = tokenizer(\"The cat <mask> the ball\", return_tensors=\"pt\").input_ids\n"
                  "logits = model(ids).logits  # [1, N, V]: the clean token at every position, never the mask")
    return f"""---
{_yaml(header)}
---

# {name}

A tiny {kind} language model trained with tdlm: {model['n_layers']} layer{'s' if model['n_layers'] != 1 else ''},
d_model {model['d_model']}, {model['n_heads']} heads, {model['positions']} positions, {model['norm']},
{model['mlp']}, {'tied' if model['tied_embeddings'] else 'untied'} embeddings; {parameters:,} parameters;
sequence length {seq_len}; tokenizer `{vocab.name}` ({vocab.size} tokens, end-of-text id {vocab.bos_id})
plus the mask token `<mask>` at id {vocab.mask_id}. Objective `{recipe['objective']['name']}`.
Exported from checkpoint `{checkpoint['name']}` (step {checkpoint['step']}, the run's `{checkpoint['which']}`).

## Figures

{figures_table(summary)}
## Use

Without tdlm (transformers and torch only; the model code is `modeling_tdlm.py` in this folder):

```python
import torch
from transformers import AutoTokenizer, {auto}

tokenizer = AutoTokenizer.from_pretrained("FOLDER", trust_remote_code=True)  # it reads config.json too
model = {auto}.from_pretrained("FOLDER", trust_remote_code=True).eval()
{use_logits}
```

With tdlm installed, `import tdlm.hf; tdlm.hf.register()` makes `trust_remote_code` unnecessary, and the
folder is a run for tdlm's commands: `tdlm eval FOLDER --split test` (the figures above),
`tdlm sample FOLDER`, `tdlm lm-eval FOLDER --tasks ...`. {"Sampling is a diffusion chain: the sampler and its settings are in diffusion_config.json." if not causal else "generation_config.json holds the recipe's sampler settings."}

## Recipe

```toml
{to_toml(recipe).strip()}
```

## Data

{data_section(data)}"""


def _yaml(table: dict) -> str:
    """The card's front matter as YAML lines (JSON values are valid YAML flow values)."""
    return "\n".join(f"{key}: {json.dumps(value)}" for key, value in table.items())
