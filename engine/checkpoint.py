"""Checkpoints: `checkpoints/step_NNNNNN/{model.safetensors, optimizer.safetensors, state.json}`.

Nothing is ever pickled: tensors go through safetensors, everything else through JSON
(RNG states base64-encoded). A checkpoint is written into a hidden temporary folder next
to its final place, every file fsynced, then renamed into place, the folder fsynced, and
only then does `checkpoints/latest` move to it, so a reader (or a resume after kill -9)
sees a complete checkpoint or none. state.json records a SHA-256 of each tensor file, so
a truncated or altered file is caught on load, not half-loaded.

torch is imported inside the functions that need it: listing, reading state.json and
verifying files stay cheap, and the TUI may use them (it never imports torch).
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from workbench.engine.errors import CheckpointError
from workbench.engine.rundir import RunDir, atomic_write_text, fsync_dir

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 1
NAME_RE = re.compile(r"^step_(\d{6,})$")
OPTIM_KEYS = ("exp_avg", "exp_avg_sq", "step")


def checkpoint_name(step: int) -> str:
    return f"step_{step:06d}"


# --- RNG states -----------------------------------------------------------------------------

def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"))


def capture_rng() -> dict[str, Any]:
    """Every random number generator the process uses, as JSON-safe values."""
    import torch

    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    return {
        "torch_cpu": _b64(torch.get_rng_state().numpy().tobytes()),
        "torch_cuda": [_b64(s.numpy().tobytes()) for s in torch.cuda.get_rng_state_all()]
        if torch.cuda.is_available() else [],
        "numpy": {"name": np_name, "keys": _b64(np.asarray(np_keys, dtype=np.uint32).tobytes()),
                  "pos": int(np_pos), "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "python": {"version": py_version, "state": _b64(np.asarray(py_state, dtype=np.uint32).tobytes()),
                   "gauss_next": py_gauss},
    }


def restore_rng(rng: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(torch.frombuffer(bytearray(_unb64(rng["torch_cpu"])), dtype=torch.uint8))
    if rng.get("torch_cuda") and torch.cuda.is_available():
        states = [torch.frombuffer(bytearray(_unb64(s)), dtype=torch.uint8) for s in rng["torch_cuda"]]
        for i, s in enumerate(states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)
    n = rng["numpy"]
    np.random.set_state((n["name"], np.frombuffer(_unb64(n["keys"]), dtype=np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    p = rng["python"]
    random.setstate((p["version"], tuple(int(x) for x in np.frombuffer(_unb64(p["state"]), dtype=np.uint32)),
                     p["gauss_next"]))


# --- tensors <-> bytes ------------------------------------------------------------------------

def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def _param_order(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's own index order (the keys of its state_dict)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """AdamW state named by parameter: '<param>.exp_avg', '<param>.exp_avg_sq', '<param>.step'."""
    import torch

    state = optimizer.state_dict()["state"]
    out = {}
    for index, name in enumerate(_param_order(model, optimizer)):
        for key in OPTIM_KEYS:
            if index in state and key in state[index]:
                out[f"{name}.{key}"] = torch.as_tensor(state[index][key]).detach().to("cpu").contiguous()
    return out


# --- saving ------------------------------------------------------------------------------------

class SaveFailed(CheckpointError):
    """A checkpoint that could not be written: its partial files are gone, earlier checkpoints untouched."""


# errno -> what it most likely means when a checkpoint is written
_WRITE_ERRORS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "over the disk quota",
    errno.EFBIG: "over the process's file size limit or the filesystem's largest file",
}


def write_error_reason(e: OSError) -> str:
    """One line for an OSError met while writing, e.g. 'No space left on device (errno 28: the disk is full)'."""
    text = e.strerror or str(e) or type(e).__name__
    if e.errno is None:
        return text
    meaning = _WRITE_ERRORS.get(e.errno)
    return f"{text} (errno {e.errno}{': ' + meaning if meaning else ''})"


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def clean_temporaries(run: RunDir) -> None:
    """Remove half-written or half-deleted checkpoint folders left by a killed process."""
    if run.checkpoints.is_dir():
        for path in run.checkpoints.iterdir():
            if path.name.startswith((".tmp-", ".trash-")) and path.is_dir():
                shutil.rmtree(path, ignore_errors=True)


def save(run: RunDir, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
         state: dict[str, Any], keep_last: int = 3, keep_best: bool = True) -> Path:
    """Write checkpoint `step_<state['step']>` atomically, point `latest` at it, apply retention.

    An OSError (a full disk) leaves no trace of this checkpoint (its temporary folder is removed)
    and touches nothing saved before: `latest` still names the previous complete one."""
    from safetensors.torch import save as st_save

    name = checkpoint_name(int(state["step"]))
    run.checkpoints.mkdir(parents=True, exist_ok=True)
    final = run.checkpoints / name
    if not final.is_dir():  # a complete checkpoint of this step already exists: same weights, keep it
        tmp = run.checkpoints / f".tmp-{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            files = {"model.safetensors": st_save(model_tensors(model), metadata={"format": "pt"})}
            if optimizer is not None:
                files["optimizer.safetensors"] = st_save(optimizer_tensors(model, optimizer),
                                                         metadata={"format": "pt"})
            digests = {}
            for filename, data in files.items():
                _write_synced(tmp / filename, data)
                digests[filename] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            full_state = {"format": FORMAT_VERSION, **state, "files": digests}
            _write_synced(tmp / "state.json", (json.dumps(full_state, indent=1) + "\n").encode())
            fsync_dir(tmp)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(run.checkpoints)
    atomic_write_text(run.latest_pointer, name + "\n")
    apply_retention(run, keep_last, keep_best)
    return final


def list_checkpoints(run: RunDir) -> list[Path]:
    """Complete checkpoint folders of a run, oldest step first."""
    if not run.checkpoints.is_dir():
        return []
    found = [p for p in run.checkpoints.iterdir() if NAME_RE.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(NAME_RE.match(p.name).group(1)))


def summaries(run: RunDir) -> list[dict[str, Any]]:
    """One row per complete checkpoint, oldest step first (file reads only, no torch): name, path,
    step, tokens, val_loss, val_bpb, train_loss, size (bytes on disk), saved_at (unix time),
    latest (what `checkpoints/latest` names) and best (lowest val loss)."""
    latest = run.latest_checkpoint()
    rows = []
    for path in list_checkpoints(run):
        try:
            state = read_state(path)
        except CheckpointError:
            state = {}
        metrics = state.get("metrics") or {}
        rows.append({
            "name": path.name, "path": str(path), "step": int(state.get("step", NAME_RE.match(path.name).group(1))),
            "tokens": state.get("tokens"), "val_loss": metrics.get("val_loss"), "val_bpb": metrics.get("val_bpb"),
            "train_loss": metrics.get("train_loss"),
            "size": sum(f.stat().st_size for f in path.iterdir() if f.is_file()),
            "saved_at": state.get("saved_at") or path.stat().st_mtime,
            "latest": latest is not None and latest.name == path.name, "best": False,
        })
    scored = [r for r in rows if isinstance(r["val_loss"], (int, float))]
    if scored:
        min(scored, key=lambda r: r["val_loss"])["best"] = True
    return rows


def apply_retention(run: RunDir, keep_last: int, keep_best: bool) -> list[Path]:
    """Delete all but the newest `keep_last` checkpoints, the best by val loss and `latest`; return the deleted."""
    all_ckpts = list_checkpoints(run)
    keep = set(p.name for p in all_ckpts[-keep_last:])
    latest = run.latest_checkpoint()
    if latest is not None:
        keep.add(latest.name)
    if keep_best:
        scored = [(_val_loss(p), p.name) for p in all_ckpts]
        scored = [(v, n) for v, n in scored if isinstance(v, (int, float))]
        if scored:
            keep.add(min(scored)[1])
    deleted = []
    for path in all_ckpts:
        if path.name not in keep:
            # Rename first: a half-deleted folder must never look like a checkpoint.
            trash = run.checkpoints / f".trash-{path.name}-{os.getpid()}"
            os.rename(path, trash)
            shutil.rmtree(trash, ignore_errors=True)
            deleted.append(path)
    return deleted


def _val_loss(ckpt: Path) -> Any:
    """The val loss state.json records; None when it is unreadable (a damaged old checkpoint must
    not crash the save that has just succeeded)."""
    try:
        return read_state(ckpt).get("metrics", {}).get("val_loss")
    except CheckpointError:
        return None


# --- loading ---------------------------------------------------------------------------------

def resolve(path: str | Path, name: str | None = None) -> Path:
    """A checkpoint folder from a checkpoint path, or a run folder (its `latest`, or `name`)."""
    path = Path(path)
    if (path / "state.json").is_file() and name is None:
        return path
    run = RunDir.at(path)
    if not path.exists():
        raise CheckpointError(f"no run or checkpoint at {path}")
    if name == "latest":
        name = None
    if name is not None:
        ckpt = run.checkpoints / name
        if not (ckpt / "state.json").is_file():
            available = ", ".join(p.name for p in list_checkpoints(run)) or "none"
            raise CheckpointError(f"run {path} has no checkpoint {name!r} (available: {available})")
        return ckpt
    latest = run.latest_checkpoint()
    if latest is None or not (latest / "state.json").is_file():
        if not run.checkpoints.is_dir() and not run.exists():
            raise CheckpointError(f"{path} is neither a run folder nor a checkpoint folder")
        raise CheckpointError(f"run {path} has no checkpoint yet")
    return latest


def read_state(ckpt: Path) -> dict[str, Any]:
    try:
        state = json.loads((Path(ckpt) / "state.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {ckpt} is incomplete: no state.json") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {ckpt} has a corrupt state.json: {e}") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"checkpoint {ckpt} has a malformed state.json")
    return state


def verify_file(ckpt: Path, filename: str, state: dict[str, Any]) -> bytes:
    """The file's bytes, after checking them against the size and SHA-256 recorded in state.json."""
    path = Path(ckpt) / filename
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {ckpt} is incomplete: no {filename}") from None
    expected = state.get("files", {}).get(filename)
    if expected and (len(data) != expected["bytes"] or hashlib.sha256(data).hexdigest() != expected["sha256"]):
        raise CheckpointError(f"checkpoint {ckpt} is corrupt: {filename} is {len(data)} bytes and does not "
                              f"match the checksum recorded when it was saved ({expected['bytes']} bytes)")
    return data


def _read_tensors(ckpt: Path, filename: str, state: dict[str, Any], data: bytes | None = None) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    if data is None:
        data = verify_file(ckpt, filename, state)
    try:
        return st_load(data)
    except SafetensorError as e:
        raise CheckpointError(f"checkpoint {ckpt} is corrupt or truncated: {filename} ({e})") from None


def _shape_text(shape) -> str:
    return "x".join(str(d) for d in shape) or "scalar"


def _describe_model(cfg: dict | None) -> str:
    if not cfg:
        return "?"
    keys = ("n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "vocab_size", "tie_embeddings")
    return " ".join(f"{k}={cfg.get(k)}" for k in keys)


def check_tokenizer(ckpt: Path, state: dict[str, Any], tokenizer_sha256: str | None) -> None:
    saved = state.get("tokenizer_sha256")
    if tokenizer_sha256 and saved and saved != tokenizer_sha256:
        raise CheckpointError(f"checkpoint {ckpt} was trained with a different tokenizer "
                              f"(sha256 {saved[:12]}) than this data's (sha256 {tokenizer_sha256[:12]}); "
                              "prepare the data with the checkpoint's tokenizer")


def check_shapes(ckpt: Path, state: dict[str, Any], model: torch.nn.Module,
                 data: bytes | None = None) -> dict[str, torch.Tensor]:
    """Read the checkpoint's weights (checksum verified, or `data` from verify_file) and check every
    name and shape against `model` (which may live on the meta device); return the tensors."""
    tensors = _read_tensors(ckpt, "model.safetensors", state, data)
    expected = model.state_dict()
    saved_model_cfg = state.get("config", {}).get("model")
    where = f"checkpoint {ckpt} does not fit this model"
    hint = f"(checkpoint: {_describe_model(saved_model_cfg)})"
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        what = f"missing {missing[0]}" if missing else f"unexpected {extra[0]}"
        raise CheckpointError(f"{where}: {what} {hint}")
    for key, want in expected.items():  # in model order: the embedding first, then layer by layer
        if tuple(tensors[key].shape) != tuple(want.shape):
            raise CheckpointError(f"{where}: {key} is {_shape_text(tensors[key].shape)} in the checkpoint but "
                                  f"{_shape_text(want.shape)} in the model {hint}")
    return tensors


def load_model(ckpt: Path, model: torch.nn.Module, tokenizer_sha256: str | None = None,
               data: bytes | None = None) -> dict[str, Any]:
    """Load weights into `model` after checking tokenizer, integrity and every shape; return state.json."""
    state = read_state(ckpt)
    check_tokenizer(ckpt, state, tokenizer_sha256)
    model.load_state_dict(check_shapes(ckpt, state, model, data))
    return state


def load_optimizer(ckpt: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                   state: dict[str, Any]) -> None:
    tensors = _read_tensors(ckpt, "optimizer.safetensors", state)
    current = optimizer.state_dict()
    params = dict(model.named_parameters())
    restored = {}
    for index, name in enumerate(_param_order(model, optimizer)):
        entry = {}
        for key in OPTIM_KEYS:
            t = tensors.get(f"{name}.{key}")
            if t is None:
                raise CheckpointError(f"checkpoint {ckpt} has no optimizer state for {name}")
            if key != "step" and t.shape != params[name].shape:
                raise CheckpointError(f"checkpoint {ckpt}: optimizer state {name}.{key} is "
                                      f"{_shape_text(t.shape)}, the parameter is {_shape_text(params[name].shape)}")
            entry[key] = t
        restored[index] = entry
    optimizer.load_state_dict({"state": restored, "param_groups": current["param_groups"]})


# --- a run's model, ready for sampling or evaluation ---------------------------------------------

@dataclass
class LoadedModel:
    cfg: Any  # workbench.engine.config.RunConfig
    model: torch.nn.Module
    tokenizer: Any  # workbench.engine.data.tokenizer.Tokenizer
    checkpoint: Path
    state: dict[str, Any]
    device: Any  # workbench.engine.device.DeviceInfo
    dataset: Any = None  # workbench.engine.data.dataset.Dataset when asked for


def open_run_model(run_path: str | Path, name: str | None = None, need_data: bool = False) -> LoadedModel:
    """Load a run's config, tokenizer and latest (or named) checkpoint onto the best device here.

    The tokenizer is the run's own copy (so sampling works after the data moved); with
    `need_data` the dataset is opened too and must use the same tokenizer.
    """
    import dataclasses

    from workbench.engine import config as config_mod
    from workbench.engine.data.dataset import Dataset
    from workbench.engine.data.tokenizer import Tokenizer

    run = RunDir.at(run_path)
    if not run.exists():
        raise CheckpointError(f"no run at {run_path} (no config.toml there)")
    cfg = config_mod.load(run.config)
    ckpt = resolve(run.root, name)
    dataset = Dataset.open(cfg.data.path) if need_data else None
    tokenizer = dataset.tokenizer if dataset is not None else Tokenizer.load(run.root / "tokenizer.model")
    state = read_state(ckpt)
    check_tokenizer(ckpt, state, tokenizer.sha256)
    data = verify_file(ckpt, "model.safetensors", state)  # a corrupt file fails here, before torch loads

    from workbench.engine.device import device_info
    from workbench.engine.model import GPT
    from workbench.kernels import select

    # Inference runs wherever this machine allows, whatever device the run trained on.
    info = device_info(dataclasses.replace(cfg.train, device="auto", dtype="auto"))
    model = GPT(cfg.model, select("auto", info.type)).to(info.device)
    state = load_model(ckpt, model, tokenizer.sha256, data)
    model.eval()
    return LoadedModel(cfg, model, tokenizer, ckpt, state, info, dataset)
