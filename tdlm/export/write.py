"""`tdlm export`: a trained run as a self-contained Hugging Face model folder.

    config.json               model_type "tdlm": every [model] option, vocab size, mask/end-of-text ids,
                              bos_id (the BOS slot's token, with shift_logits), objective, auto_map
                              (trust_remote_code)
    model.safetensors         tdlm.lm.LanguageModel.state_dict() as a checkpoint holds it: `net.*` the
                              Transformer, `objective.*` component state (learned masking weights)
    configuration_tdlm.py     the standalone model code (torch + transformers, no tdlm), from tdlm/hf/
    modeling_tdlm.py
    tokenizer.json            the run's byte-level BPE with <|endoftext|> and <mask> (id V) special
    tokenizer_config.json  special_tokens_map.json
    diffusion_config.json     (diffusion) objective, corruption, schedule, sampler, mask id, seq_len
    generation_config.json    (AR) bos/eos and the recipe's sampler settings
    README.md                 the model card: figures, use, recipe, data hashes
    tdlm_run.json             the resolved recipe, the run's data.json, checkpoint, environment,
                              summary: what tdlm reads the folder back with (tdlm.export.folder)

The folder is assembled beside its destination, every file by tdlm.files.write_atomically, and
renamed into place (tdlm.files.rename_folder): a failed or killed export leaves no half folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tdlm.export.folder import FORMAT, RUN_FILE, VERSION, WEIGHTS_FILE, ExportError, is_export
from tdlm.files import rename_folder, write_atomically

MODEL_OPTIONS = ("n_layers", "d_model", "n_heads", "d_ff", "positions", "norm", "mlp", "tied_embeddings",
                 "dropout", "bias", "shift_logits")
"""The [model] options the standalone modeling_tdlm.py implements. An option tdlm gains that is not
here makes the export refuse: the copy would compute something else than tdlm's model."""


def hf_config(model_cfg, *, vocab_size: int, mask_id: int, eot_id: int, seq_len: int, causal: bool,
              objective: str, dtype: str = "float32") -> dict:
    """config.json of the exported network (what TdlmConfig reads)."""
    from tdlm import __version__
    from tdlm.model import mlp_width

    unknown = sorted(set(type(model_cfg).model_fields) - set(MODEL_OPTIONS))
    if unknown:
        raise ExportError(f"model option(s) {', '.join(unknown)} are not implemented by the exported model code "
                          "(tdlm/hf/modeling_tdlm.py): this tdlm cannot export the run")
    arch, auto = ("TdlmForCausalLM", "AutoModelForCausalLM") if causal else ("TdlmForMaskedLM", "AutoModelForMaskedLM")
    options = model_cfg.model_dump(mode="json")
    options["d_ff"] = mlp_width(model_cfg)  # the width as trained, not tdlm's rule for it
    return {"model_type": "tdlm", "architectures": [arch],
            "auto_map": {"AutoConfig": "configuration_tdlm.TdlmConfig", auto: f"modeling_tdlm.{arch}"},
            "vocab_size": vocab_size, **{k: options[k] for k in MODEL_OPTIONS}, "max_len": seq_len,
            "causal": causal, "objective": objective, "mask_id": mask_id, "eot_id": eot_id,
            "bos_id": eot_id if model_cfg.shift_logits else None,  # tdlm.model.Transformer's BOS slot
            "bos_token_id": eot_id, "eos_token_id": eot_id, "tie_word_embeddings": False, "dtype": dtype,
            "tdlm_version": __version__}


def write_network(folder: Path, model_cfg, state_dict: dict, **facts) -> None:
    """config.json, model.safetensors and the standalone model code into `folder`; `facts` are
    hf_config's keywords (dtype follows the weights)."""
    import torch
    from safetensors.torch import save

    from tdlm.hf import standalone_sources

    # own copies: safetensors refuses tensors sharing memory, and a view would save its whole base
    tensors = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state_dict.items()}
    floats = [v.dtype for v in tensors.values() if v.is_floating_point()]
    dtype = str(floats[0] if floats else torch.float32).removeprefix("torch.")
    config = hf_config(model_cfg, dtype=dtype, **facts)
    write_atomically(folder / "config.json", json.dumps(config, indent=2) + "\n")
    # serialized in memory, then written by write_atomically: on the disk before the folder is
    # renamed into place, and a full disk is a WriteError (safetensors' own writer has its own type)
    write_atomically(folder / WEIGHTS_FILE, save(tensors, metadata={"format": "pt"}))
    for name, text in standalone_sources().items():
        write_atomically(folder / name, text)


def outside_state(built) -> list[str]:
    """What the run's components hold that model.safetensors would not carry: tensors or modules
    kept as plain attributes (not parameters or buffers, so not in the state_dict, and maybe
    changed by training), and a sampler's draft model (another run)."""
    import torch
    from torch import nn

    from tdlm.components.draft import DraftMixin

    objective = built.model.objective
    ours = {id(m) for m in built.model.modules()}
    parts = {"schedule": objective.corruption.schedule, "corruption": objective.corruption, "objective": objective,
             "sampler": built.sampler}
    found, seen = [], set()
    for kind, part in parts.items():
        modules = part.named_modules() if isinstance(part, nn.Module) else [("", part)]
        for prefix, module in modules:
            if id(module) in seen:  # the objective's corruption: reported as the corruption's
                continue
            seen.add(id(module))
            for attr, value in vars(module).items():
                if isinstance(value, torch.Tensor) or (isinstance(value, nn.Module) and id(value) not in ours):
                    found.append(f"{kind} {type(part).__name__} holds {prefix + '.' if prefix else ''}{attr} "
                                 "outside its state_dict (register it as a parameter or persistent buffer)")
    if isinstance(built.sampler, DraftMixin) and getattr(built.sampler.config, "draft", None):
        found.append(f"sampler {type(built.sampler).__name__} drafts with another run's model "
                     f"(draft = {built.sampler.config.draft!r}), which one folder cannot carry")
    return found


def sampling_config(recipe: dict, *, causal: bool, vocab, seq_len: int, state_dict: dict) -> tuple[str, dict]:
    """(file name, content): generation_config.json for AR, diffusion_config.json for diffusion."""
    if causal:
        sampler = recipe["sampler"]
        config = {"bos_token_id": vocab.bos_id, "eos_token_id": vocab.bos_id, "max_length": seq_len}
        if "temperature" in sampler:  # tdlm's `ar` sampler; None means off (HF: top_k 0, top_p 1)
            config.update(do_sample=True, temperature=sampler["temperature"], top_k=sampler.get("top_k") or 0,
                          top_p=sampler.get("top_p") or 1.0)
        return "generation_config.json", config
    return "diffusion_config.json", {
        "objective": recipe["objective"], "corruption": recipe["corruption"], "schedule": recipe["schedule"],
        "sampler": recipe["sampler"], "mask_id": vocab.mask_id, "eot_id": vocab.bos_id, "seq_len": seq_len,
        "component_tensors": sorted(k for k in state_dict if not k.startswith("net.")),
    }


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def check_destination(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out} already exists and is not an empty folder; export into a new folder "
                          "(nothing was overwritten)")
    if not out.resolve().parent.is_dir():
        raise ExportError(f"the folder {out.resolve().parent} does not exist; create it first")


def export_run(run_dir: str | Path, out_dir: str | Path, *, which: str = "best", progress: bool = False) -> Path:
    """Write checkpoint `which` of the run in `run_dir` as a Hugging Face model folder `out_dir`."""
    from tdlm.config import resolved_dict
    from tdlm.data.record import read_record
    from tdlm.export.card import model_card
    from tdlm.export.tokenizer import tokenizer_files
    from tdlm.rundir import load_run

    run_dir, out = Path(run_dir), Path(out_dir)
    if is_export(run_dir):
        raise ExportError(f"{run_dir} is already an exported folder; copy it instead")
    check_destination(out)
    loaded = load_run(run_dir, which=which, device="cpu", action="exporting it", progress=progress)
    problems = outside_state(loaded.built)
    if problems:
        raise ExportError(f"cannot export {run_dir}: {'; '.join(problems)}")
    cfg, vocab, model = loaded.cfg, loaded.corpus.vocab, loaded.built.model
    causal, seq_len = bool(model.objective.causal), cfg.data.seq_len
    recipe, state_dict = resolved_dict(cfg, loaded.components), model.state_dict()
    checkpoint = {"name": loaded.checkpoint.name, "step": int(loaded.checkpoint.name.rsplit("-", 1)[-1]),
                  "which": which}
    summary, data = _read_json(run_dir / "summary.json"), read_record(run_dir)
    if (summary or {}).get("checkpoint") != checkpoint["name"]:
        summary = None  # its figures are another checkpoint's
    staging = out.resolve().parent / f".{out.name}.export-tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        write_network(staging, cfg.model, state_dict, vocab_size=vocab.size, mask_id=vocab.mask_id,
                      eot_id=vocab.bos_id, seq_len=seq_len, causal=causal, objective=cfg.objective.name)
        texts = tokenizer_files(vocab, seq_len)
        name, sampling = sampling_config(recipe, causal=causal, vocab=vocab, seq_len=seq_len, state_dict=state_dict)
        texts[name] = json.dumps(sampling, indent=2) + "\n"
        texts["README.md"] = model_card(name=cfg.run.name, recipe=recipe, causal=causal, vocab=vocab,
                                        parameters=model.net.num_parameters(), checkpoint=checkpoint,
                                        summary=summary, data=data)
        run = {"format": FORMAT, "version": VERSION, "recipe": recipe, "data": data, "checkpoint": checkpoint,
               "source": str(run_dir.resolve()),
               "summary": {k: v for k, v in (summary or {}).items() if k != "samples"} or None,
               "environment": _read_json(run_dir / "environment.json")}
        texts[RUN_FILE] = json.dumps(run, indent=2) + "\n"
        for file, text in texts.items():
            write_atomically(staging / file, text)
        if out.exists():
            out.rmdir()  # empty (checked above)
        rename_folder(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
