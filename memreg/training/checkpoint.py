"""Checkpoints, resume and final outputs, in diffusers/peft formats (no pickled models).

* Crash-safe saves (:func:`save_checkpoint`): every process writes into ``checkpoint-<step>.tmp-<pid>``;
  then the main process writes ``checkpoint_complete.json`` (every file with its size and sha256) last,
  renames the dir to ``checkpoint-<step>`` and only then prunes old checkpoints. ``latest`` skips dirs
  without a valid marker, with a file changed since the save, and leftover ``.tmp-`` dirs, with a
  warning naming them; a resume from a checkpoint missing its marker, a file, or optimizer/scheduler/
  RNG state, or one whose state files hold Python objects, is a :class:`CheckpointError`.
* A full disk during a save is a :class:`~memreg.errors.DiskFullError` naming the path and the newest
  intact checkpoint; the partial save is removed.
* ``latest`` on a finished run (final weights, no checkpoint) is refused instead of retraining over it.
* ``accelerator.save_state`` runs on every process; hooks registered here write the trainable
  weights as diffusers files (LoRA: ``pytorch_lora_weights.safetensors``, loadable by
  ``load_lora_weights``; full: ``unet/`` and ``unet_ema/`` model dirs) and pop them so accelerate
  does not also save ``model.safetensors``. Optimizer, LR scheduler and RNG states are accelerate's.
* Guard state (the penalty's generator and calibrated tau, the Wen filter's tau, the caption-noise
  generator) is written per process as ``guard_state_{rank}.safetensors`` (tensors) +
  ``guard_state_{rank}.json`` (scalars) and restored by the load hook.
* Final outputs: LoRA -> ``pytorch_lora_weights.safetensors`` (with the adapter's rank/alpha as
  metadata) and a kohya copy ``pytorch_lora_weights_kohya.safetensors`` (``lora_unet_*`` /
  ``lora_te_*`` keys, ``alpha`` = lora_alpha) for A1111/ComfyUI; full -> a diffusers pipeline dir;
  with ``config.yaml``. They appear together or not at all (:func:`write_final_outputs`): a run is
  finished only once ``final_complete.json`` is in place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import broadcast_object_list
from accelerate.utils import load as accelerate_load
from diffusers import UNet2DConditionModel
from diffusers.training_utils import EMAModel, _set_state_dict_into_text_encoder
from diffusers.utils import convert_state_dict_to_kohya, convert_unet_state_dict_to_peft
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from memreg.errors import DiskFullError, MemregError, is_disk_full, one_line
from memreg.families import family_named, family_of
from memreg.models import LORA_WEIGHT_NAME

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
KOHYA_WEIGHT_NAME = "pytorch_lora_weights_kohya.safetensors"
COMPLETE_MARKER = "checkpoint_complete.json"   # written last; lists every file with its size and sha256
TMP_TAG = ".tmp-"                              # checkpoint-<step>.tmp-<pid>: a save in progress
FINAL_MARKER = "final_complete.json"           # written after every final output is in place
FINAL_TMP_PREFIX = "final.tmp-"                # final.tmp-<pid>: the final outputs being written
LOCK_NAME = ".memreg.lock"                     # the output-dir lock (memreg.training.output_dir); not run output


class CheckpointError(MemregError, ValueError):
    """A resume request or output directory that cannot be used; the message names the path."""


# --------------------------------------------------------------------------- directories

def check_output_dir(output_dir: str, resuming: bool, overwrite: bool) -> None:
    """Refuse a non-empty output_dir unless resuming or ``overwrite_output_dir`` (which moves the
    old run aside, see :mod:`memreg.training.output_dir`); the two together are contradictory."""
    p = Path(output_dir)
    if p.exists() and not p.is_dir():
        raise CheckpointError(f"output_dir {output_dir!r} exists and is not a directory")
    if resuming and overwrite:
        raise CheckpointError("--overwrite_output_dir true moves the previous run aside and "
                              "--resume_from_checkpoint continues it: give one of them")
    used = p.is_dir() and any(c.name != LOCK_NAME for c in p.iterdir())
    if used and not (resuming or overwrite):
        raise CheckpointError(f"output_dir {output_dir!r} is not empty; pass --resume_from_checkpoint latest to "
                              "continue that run, or --overwrite_output_dir true to move it aside and start over")


def step_of(path: str | Path) -> int:
    m = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", Path(path).name)
    if not m:
        raise CheckpointError(f"{str(path)!r} is not a checkpoint directory ({CHECKPOINT_PREFIX}<step>)")
    return int(m.group(1))


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Every ``checkpoint-<step>`` dir, complete or not, by step."""
    p = Path(output_dir)
    if not p.is_dir():
        return []
    dirs = [d for d in p.iterdir() if d.is_dir() and re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", d.name)]
    return sorted(dirs, key=step_of)


def unfinished_saves(output_dir: str | Path) -> list[Path]:
    """Leftovers of interrupted saves: ``checkpoint-<step>.tmp-<pid>`` / ``.old-<pid>`` dirs."""
    p = Path(output_dir)
    if not p.is_dir():
        return []
    rx = rf"{CHECKPOINT_PREFIX}\d+\.(tmp|old)-\d+"
    return sorted(d for d in p.iterdir() if d.is_dir() and re.fullmatch(rx, d.name))


def unfinished_finals(output_dir: str | Path) -> list[Path]:
    """Leftovers of an interrupted final save: ``final.tmp-<pid>`` dirs."""
    p = Path(output_dir)
    if not p.is_dir():
        return []
    return sorted(d for d in p.iterdir() if d.is_dir() and re.fullmatch(rf"{re.escape(FINAL_TMP_PREFIX)}\d+", d.name))


def has_final_outputs(output_dir: str | Path) -> str | None:
    """The name of a finished run's final weights in ``output_dir`` (LoRA file or pipeline), else None.

    A finished run has :data:`FINAL_MARKER`, written after every final file is in place. Without it, a
    ``final.tmp-<pid>`` dir means the final save was killed (not finished); outputs of a run from before
    the marker existed count as finished when no such dir is there."""
    d = Path(output_dir)
    marker = d / FINAL_MARKER
    if marker.is_file():
        try:
            return str(json.loads(marker.read_text())["weights"])
        except (ValueError, KeyError, TypeError):
            return FINAL_MARKER
    if unfinished_finals(d):
        return None
    for name in (LORA_WEIGHT_NAME, "model_index.json"):
        if (d / name).is_file():
            return name
    return None


def _replace_entry(src: Path, dest: Path) -> None:
    """Move a file or directory over ``dest`` (an earlier final output of the same name)."""
    if dest.is_dir() and not dest.is_symlink():
        old = dest.with_name(f"{dest.name}.old-{os.getpid()}")
        os.replace(dest, old)
        os.replace(src, dest)
        shutil.rmtree(old)
    else:
        os.replace(src, dest)


def write_final_outputs(output_dir: str | Path, write, step: int) -> list[str]:
    """Final outputs that appear together or not at all: ``write(tmp_dir)`` writes them into
    ``final.tmp-<pid>``, a marker listing every file (size, sha256) is added, the entries are moved
    into ``output_dir`` and the marker is moved last. A kill before that leaves no marker, so
    ``latest`` resumes from the last checkpoint and writes them again. Returns the names written."""
    out = Path(output_dir)
    for stale in unfinished_finals(out):
        logger.warning("removing the unfinished final save %s", stale)
        shutil.rmtree(stale)
    tmp = out / f"{FINAL_TMP_PREFIX}{os.getpid()}"
    tmp.mkdir(parents=True)
    with disk_full_as_error(tmp, out, cleanup=tmp):
        write(tmp)
        names = sorted(e.name for e in tmp.iterdir())
        weights = next((n for n in (LORA_WEIGHT_NAME, "model_index.json") if n in names), names[0] if names else "")
        _write_json_atomic(tmp / FINAL_MARKER, {"step": step, "weights": weights, "files": _inventory(tmp)})
    if (out / FINAL_MARKER).is_file():
        logger.warning("replacing the final outputs in %s (an earlier finish of this run)", out)
        (out / FINAL_MARKER).unlink()
    for name in names:
        _replace_entry(tmp / name, out / name)
    os.replace(tmp / FINAL_MARKER, out / FINAL_MARKER)
    _fsync_dir(out)
    tmp.rmdir()
    return names


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint; incomplete ones and unfinished saves are skipped with a warning
    naming them."""
    skipped = [f"{d.name} (unfinished save)" for d in unfinished_saves(output_dir)]
    found = None
    for d in reversed(list_checkpoints(output_dir)):
        problem = completeness_problem(d, content=True)
        if problem is None:
            found = d
            break
        skipped.append(f"{d.name} ({problem})")
    if skipped:
        logger.warning("resume_from_checkpoint=latest: skipping incomplete checkpoint(s) in %s: %s; %s",
                       output_dir, "; ".join(skipped),
                       f"resuming from {found.name}" if found else "no complete checkpoint left")
    return found


def resolve_resume(resume: str | None, output_dir: str, num_processes: int = 1,
                   allow_incomplete: bool = False) -> Path | None:
    """The checkpoint dir to resume from: ``latest`` (None when there is none and nothing to lose) or a
    path/name. A finished run without checkpoints is refused; the chosen checkpoint is verified
    (:func:`verify_checkpoint`)."""
    if not resume:
        return None
    if resume == "latest":
        path = latest_checkpoint(output_dir)
        if path is None:
            final = has_final_outputs(output_dir)
            if final:
                raise CheckpointError(
                    f"resume_from_checkpoint=latest: {output_dir!r} holds a finished run ({final}) and no complete "
                    "checkpoint, so there is nothing to resume; use a new --output_dir, or --overwrite_output_dir "
                    "true to move that run aside and train again")
            broken = list_checkpoints(output_dir)
            if broken:
                raise CheckpointError(
                    f"resume_from_checkpoint=latest: no checkpoint in {output_dir!r} is complete "
                    f"({', '.join(f'{d.name}: {completeness_problem(d, content=True)}' for d in broken)}); name one "
                    "explicitly to see what is missing, or use --overwrite_output_dir true to move the run aside "
                    "and start over")
            logger.warning("resume_from_checkpoint=latest: no complete checkpoint in %s; starting at step 0",
                           output_dir)
            return None
    else:
        path = next((c for c in (Path(resume), Path(output_dir) / resume) if c.is_dir()), None)
        if path is None:
            raise CheckpointError(f"resume_from_checkpoint {resume!r}: no such checkpoint (looked in {output_dir!r})")
        step_of(path)
    verify_checkpoint(path, num_processes, allow_incomplete)
    return path


def prune_checkpoints(output_dir: str | Path, limit: int | None, keep: Path | None = None) -> list[Path]:
    """After a save: delete the oldest *complete* checkpoints beyond ``limit`` (never ``keep``) and the
    leftovers of interrupted saves (the output-dir lock makes them dead). Returns the removed dirs."""
    removed = []
    for d in unfinished_saves(output_dir):
        logger.warning("removing the unfinished checkpoint save %s", d)
        shutil.rmtree(d)
        removed.append(d)
    if limit is None:
        return removed
    complete = [d for d in list_checkpoints(output_dir) if completeness_problem(d) is None]
    old = [d for d in complete if keep is None or d.resolve() != Path(keep).resolve()]
    for d in old[:max(len(complete) - limit, 0)]:
        logger.info("removing old checkpoint %s (checkpoints_total_limit=%d)", d, limit)
        shutil.rmtree(d)
        removed.append(d)
    return removed


# --------------------------------------------------------------------------- crash-safe save

def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, streamed in 1 MiB blocks (``hashlib.file_digest`` needs Python 3.11)."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_json_atomic(path: Path, payload: dict) -> None:
    tmp = path.with_name(path.name + ".part")
    with tmp.open("w") as fh:
        json.dump(payload, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _inventory(directory: Path) -> dict[str, dict]:
    """Every file below ``directory`` with its size and sha256 (what a marker records)."""
    return {str(f.relative_to(directory)): {"size": f.stat().st_size, "sha256": file_sha256(f)}
            for f in sorted(directory.rglob("*")) if f.is_file()}


def _write_marker(directory: Path, step: int, num_processes: int) -> None:
    """List every file of ``directory`` with its size and content hash; written last, atomically, fsynced."""
    _write_json_atomic(directory / COMPLETE_MARKER,
                       {"step": step, "num_processes": num_processes, "files": _inventory(directory)})


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # not supported on every filesystem
        pass
    finally:
        os.close(fd)


def _move_into_place(tmp: Path, final: Path) -> None:
    """Rename a complete ``tmp`` to ``final``; an existing ``final`` (a stale checkpoint of the same step,
    from before a resume) is moved aside first and removed only after the rename."""
    old = None
    if final.exists():
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        logger.warning("replacing the existing %s with the new save of that step", final)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old)


def _shared_pid(accelerator) -> int:
    """The main process's PID on every process (names the temporary save dir)."""
    pid = [os.getpid()]
    if accelerator.num_processes > 1:
        broadcast_object_list(pid, from_process=0)
    return int(pid[0])


def save_checkpoint(accelerator, output_dir: str | Path, step: int, total_limit: int | None = None) -> Path:
    """``accelerator.save_state`` into ``checkpoint-<step>.tmp-<pid>``; when every process has written,
    the main process adds the completeness marker, renames it to ``checkpoint-<step>`` and only then
    prunes old checkpoints. A kill at any point leaves the previous checkpoints intact."""
    out = Path(output_dir)
    final = out / f"{CHECKPOINT_PREFIX}{step}"
    tmp = out / f"{final.name}{TMP_TAG}{_shared_pid(accelerator)}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    with disk_full_as_error(tmp, out, cleanup=tmp if accelerator.is_main_process else None):
        accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _write_marker(tmp, step, accelerator.num_processes)
    if accelerator.is_main_process:
        _move_into_place(tmp, final)
        prune_checkpoints(out, total_limit, keep=final)
    accelerator.wait_for_everyone()
    return final


@contextmanager
def disk_full_as_error(writing: Path, output_dir: Path, cleanup: Path | None = None):
    """Turn a full disk while writing ``writing`` into :class:`~memreg.errors.DiskFullError` naming the
    path and the checkpoints that are intact; ``cleanup`` (the unfinished save) is removed to free space."""
    try:
        yield
    except Exception as e:
        if not is_disk_full(e):
            raise
        if cleanup is not None:
            shutil.rmtree(cleanup, ignore_errors=True)
        where = getattr(e, "filename", None) or writing
        intact = latest_checkpoint_name(output_dir)
        raise DiskFullError(f"no space left on device while writing {where}; "
                            + (f"checkpoints up to {intact} are intact" if intact else "no checkpoint was written yet")
                            ) from None


# --------------------------------------------------------------------------- completeness on resume

def completeness_problem(path: str | Path, content: bool = False) -> str | None:
    """None if ``path`` has its completeness marker and every file it lists at the recorded size (and,
    with ``content``, the recorded sha256); else what is wrong, naming the file. Sizes catch a truncated
    save; the hash catches a file changed after the save at the same size. The hash is read when a run
    resumes (its cost is in README's reliability section), not when old checkpoints are pruned."""
    d = Path(path)
    marker = d / COMPLETE_MARKER
    if not marker.is_file():
        return f"no {COMPLETE_MARKER}: the save did not finish"
    try:
        files = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"unreadable {COMPLETE_MARKER}"
    for rel, rec in files.items():
        size, digest = (rec["size"], rec.get("sha256")) if isinstance(rec, dict) else (rec, None)
        f = d / rel
        if not f.is_file():
            return f"{rel} is missing"
        if f.stat().st_size != size:
            return f"{rel} has {f.stat().st_size} bytes, {size} were written"
        if content and digest is not None and file_sha256(f) != digest:
            return f"{rel} has changed since it was saved (its sha256 differs from the one recorded at save)"
    return None


def required_files(num_processes: int) -> list[str]:
    """Files without which a resume cannot continue exactly (accelerate's names; weights checked apart)."""
    return ["optimizer.bin", "scheduler.bin"] + [f"random_states_{r}.pkl" for r in range(num_processes)]


def verify_checkpoint(path: str | Path, num_processes: int = 1, allow_incomplete: bool = False) -> None:
    """Raise :class:`CheckpointError` naming the first problem (no marker, a missing or truncated file,
    missing optimizer/scheduler/RNG state or weights); ``allow_incomplete`` logs it loudly instead.
    Guard state is checked by the load hook (:func:`load_guard_state`)."""
    d = Path(path)
    problems = [p for p in [completeness_problem(d, content=True)] if p]
    problems += [f"{n} is missing" for n in required_files(num_processes) if not (d / n).is_file()]
    if not ((d / LORA_WEIGHT_NAME).is_file() or (d / "unet").is_dir()):
        problems.append(f"no weights ({LORA_WEIGHT_NAME} or unet/)")
    if not problems:
        return
    msg = f"checkpoint {str(d)!r} is incomplete: {'; '.join(problems)}"
    if not allow_incomplete:
        raise CheckpointError(msg + " (resume from an earlier checkpoint, or allow_incomplete_checkpoint "
                                    "to continue without what is missing)")
    logger.warning("!" * 20 + " %s; continuing because allow_incomplete_checkpoint is set: the resumed run "
                   "will NOT match an uninterrupted one " + "!" * 20, msg)


def load_tensors_only(path: Path, map_location="cpu"):
    """``torch.load`` with ``weights_only=True`` (and accelerate's numpy allowances for RNG states) that
    names the file: a pickle holding Python objects is refused, never loaded. torch's zip format is
    memory-mapped, so checking a multi-GB optimizer state reads only its pickled structure."""
    try:
        return accelerate_load(str(path), map_location=map_location, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError:
        raise CheckpointError(f"refusing to load {path}: it contains Python objects; memreg loads tensors only") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint file {path} cannot be read ({one_line(e)})") from None


def _check_rng_state(path: Path) -> None:
    """The RNG file loads and every state in it can be set (what accelerate does, which logs a failure at
    INFO and goes on)."""
    states = load_tensors_only(path)
    try:
        random.Random().setstate(states["random_state"])
        np.random.RandomState().set_state(states["numpy_random_seed"])
        torch.Generator().set_state(states["torch_manual_seed"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint file {path} holds no usable random state ({one_line(e)})") from None


def check_state_files(path: str | Path, num_processes: int = 1) -> None:
    """Before any weights load: the optimizer, scheduler and RNG states of a verified checkpoint load
    as tensors only, and the RNG states can be set. A missing file was reported by
    :func:`verify_checkpoint` (an error unless ``allow_incomplete_checkpoint``)."""
    d = Path(path)
    for name in ("optimizer.bin", "scheduler.bin", "scaler.pt"):
        if (d / name).is_file():
            load_tensors_only(d / name)
    for rank in range(num_processes):
        f = d / f"random_states_{rank}.pkl"
        if f.is_file():
            _check_rng_state(f)


def latest_checkpoint_name(output_dir: str | Path) -> str | None:
    """The newest checkpoint whose save finished (sizes checked), by name; for messages."""
    done = [d for d in list_checkpoints(output_dir) if completeness_problem(d) is None]
    return done[-1].name if done else None


# --------------------------------------------------------------------------- guard state

def _split_state(state: Any, prefix: str, tensors: dict, rest: Any):
    if isinstance(state, torch.Tensor):
        tensors[prefix] = state.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(state, dict):
        return {k: _split_state(v, f"{prefix}.{k}", tensors, rest) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return [_split_state(v, f"{prefix}.{i}", tensors, rest) for i, v in enumerate(state)]
    return state


def _join_state(obj: Any, tensors: dict):
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        return {k: _join_state(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_state(v, tensors) for v in obj]
    return obj


def save_guard_state(objects: dict[str, Any], directory: str | Path, rank: int) -> None:
    """Write ``{name: obj.state_dict()}`` as safetensors + json for this process."""
    if not objects:
        return
    tensors: dict[str, torch.Tensor] = {}
    meta = {name: _split_state(obj.state_dict(), name, tensors, None) for name, obj in objects.items()}
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(d / f"guard_state_{rank}.safetensors"))
    (d / f"guard_state_{rank}.json").write_text(json.dumps(meta))


def load_guard_state(objects: dict[str, Any], directory: str | Path, rank: int) -> None:

    if not objects:
        return
    d = Path(directory)
    jpath = d / f"guard_state_{rank}.json"
    if not jpath.is_file():
        raise CheckpointError(f"checkpoint {str(d)!r} has no {jpath.name} (saved with another guard or "
                              "process count?)")
    tensors = load_file(str(d / f"guard_state_{rank}.safetensors"))
    meta = json.loads(jpath.read_text())
    for name, obj in objects.items():
        if name not in meta:
            raise CheckpointError(f"checkpoint {str(d)!r} holds no state for guard component {name!r}")
        obj.load_state_dict(_join_state(meta[name], tensors))


# --------------------------------------------------------------------------- LoRA

def lora_state_dicts(unet, text_encoder=None) -> tuple[dict, dict | None]:
    """(unet, text_encoder) LoRA weights in peft key format (``<module>.lora_A.weight``; fp32, cpu).

    peft format, not diffusers' older ``lora.down``/``lora.up`` one: ``convert_state_dict_to_diffusers``
    renames only attention projections, so a LoRA that also targets convolutions or feed-forward layers
    came out in a mix of both formats, and ``load_lora_weights`` then silently dropped the attention
    weights. ``load_lora_weights`` reads peft keys as they are."""
    def grab(model):
        sd = get_peft_model_state_dict(model)
        return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in sd.items()}

    return grab(unet), (grab(text_encoder) if text_encoder is not None else None)


def kohya_state_dict(unet, text_encoder=None, lora_alpha: float | None = None, text_encoder_2=None,
                     family=None) -> dict[str, torch.Tensor]:
    """A1111/ComfyUI (kohya) keys: ``lora_unet_*.lora_down/lora_up.weight`` + ``*.alpha``; text
    encoders as the family names them (SD 1.x/2.x ``lora_te_``, SDXL ``lora_te1_``/``lora_te2_``)."""
    family = family or family_named("sd1")
    peft_sd = {f"unet.{k}": v.detach().to("cpu", torch.float32) for k, v in get_peft_model_state_dict(unet).items()}
    for prefix, enc in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        if enc is not None:
            peft_sd.update({f"{prefix}.{k}": v.detach().to("cpu", torch.float32)
                            for k, v in get_peft_model_state_dict(enc).items()})
    kohya = convert_state_dict_to_kohya(peft_sd)
    out = {}
    for k, v in kohya.items():
        k = family.kohya_key(k, unet.config)
        if k.endswith(".alpha") and lora_alpha is not None:
            v = torch.tensor(float(lora_alpha))
        out[k] = v.contiguous()
    return out


def save_lora(output_dir: str | Path, unet, text_encoder=None, kohya: bool = True, text_encoder_2=None,
              family=None) -> dict[str, Path]:
    """Write the diffusers LoRA file (+ kohya copy) with the family's pipeline class (its
    ``load_lora_weights`` reads it back: SD 1.x/2.x ``StableDiffusionPipeline``, SDXL
    ``StableDiffusionXLPipeline``, whose second text encoder is ``text_encoder_2``); returns the paths written."""
    family = family or family_named("sd1")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    unet_sd, te_sd = lora_state_dicts(unet, text_encoder)
    unet_meta = unet.peft_config["default"].to_dict()
    te_meta = text_encoder.peft_config["default"].to_dict() if text_encoder is not None else None
    extra = {}
    if text_encoder_2 is not None:
        extra = {"text_encoder_2_lora_layers": lora_state_dicts(text_encoder_2)[0],
                 "text_encoder_2_lora_adapter_metadata": text_encoder_2.peft_config["default"].to_dict()}
    family.pipeline_class().save_lora_weights(
        save_directory=str(output_dir), unet_lora_layers=unet_sd, text_encoder_lora_layers=te_sd,
        safe_serialization=True, unet_lora_adapter_metadata=unet_meta,
        text_encoder_lora_adapter_metadata=te_meta, **extra)
    written = {"diffusers": output_dir / LORA_WEIGHT_NAME}
    if kohya:
        alpha = unet_meta.get("lora_alpha")
        rank = unet_meta.get("r")
        save_file(kohya_state_dict(unet, text_encoder, alpha, text_encoder_2, family), str(output_dir / KOHYA_WEIGHT_NAME),
                  metadata={"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                            "ss_network_alpha": str(alpha), "format": "pt"})
        written["kohya"] = output_dir / KOHYA_WEIGHT_NAME
    return written


def load_lora_into(input_dir: str | Path, unet, text_encoder=None, text_encoder_2=None, family=None) -> None:
    """Load a checkpoint's diffusers LoRA file back into peft-adapted models (exact copy)."""
    lora_sd, _ = (family or family_named("sd1")).pipeline_class().lora_state_dict(str(input_dir))
    unet_sd = {k[len("unet."):]: v for k, v in lora_sd.items() if k.startswith("unet.")}
    unet_sd = convert_unet_state_dict_to_peft(unet_sd)
    result = set_peft_model_state_dict(unet, unet_sd, adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise CheckpointError(f"checkpoint {str(input_dir)!r}: unexpected LoRA keys {unexpected[:5]}")
    if text_encoder is not None:
        _set_state_dict_into_text_encoder(lora_sd, prefix="text_encoder.", text_encoder=text_encoder)
    if text_encoder_2 is not None:
        _set_state_dict_into_text_encoder(lora_sd, prefix="text_encoder_2.", text_encoder=text_encoder_2)


# --------------------------------------------------------------------------- hooks

def register_hooks(accelerator, mode: str, unet, text_encoder=None, ema=None,
                   guard_objects: dict[str, Any] | None = None, text_encoder_2=None, family=None) -> None:
    """Save/load hooks for ``accelerator.save_state``/``load_state``.

    ``unet``/``text_encoder``/``text_encoder_2``: the unwrapped trainable models (the text encoders
    only when trained; the second is SDXL's); ``family``: whose LoRA format (default SD 1.x).
    """
    guard_objects = guard_objects or {}

    def _which(model):
        m = accelerator.unwrap_model(model)
        if m is unet:
            return "unet"
        if text_encoder is not None and m is text_encoder:
            return "text_encoder"
        if text_encoder_2 is not None and m is text_encoder_2:
            return "text_encoder_2"
        return None

    def save_hook(models, weights, output_dir):
        handled = [i for i, m in enumerate(models) if _which(m) is not None]
        if accelerator.is_main_process:
            if mode == "lora":
                save_lora(output_dir, unet, text_encoder, kohya=False, text_encoder_2=text_encoder_2, family=family)
            else:
                unet.save_pretrained(os.path.join(output_dir, "unet"), safe_serialization=True)
                for sub, enc in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
                    if enc is not None:
                        enc.save_pretrained(os.path.join(output_dir, sub), safe_serialization=True)
                if ema is not None:
                    ema.save_pretrained(os.path.join(output_dir, "unet_ema"))
        for i in sorted(handled, reverse=True):
            if i < len(weights):
                weights.pop(i)
        save_guard_state(guard_objects, output_dir, accelerator.process_index)

    def load_hook(models, input_dir):
        for i in sorted((i for i, m in enumerate(models) if _which(m) is not None), reverse=True):
            models.pop(i)
        if mode == "lora":
            load_lora_into(input_dir, unet, text_encoder, text_encoder_2, family)
        else:
            loaded = UNet2DConditionModel.from_pretrained(input_dir, subfolder="unet")
            unet.register_to_config(**loaded.config)
            unet.load_state_dict(loaded.state_dict())
            del loaded
            for sub, enc in (("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
                if enc is not None:
                    enc.load_state_dict(type(enc).from_pretrained(input_dir, subfolder=sub).state_dict())
            if ema is not None:
                loaded_ema = EMAModel.from_pretrained(os.path.join(input_dir, "unet_ema"), UNet2DConditionModel)
                ema.load_state_dict(loaded_ema.state_dict())
                ema.to(accelerator.device)
                del loaded_ema
        load_guard_state(guard_objects, input_dir, accelerator.process_index)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# --------------------------------------------------------------------------- full pipeline

def save_full_pipeline(output_dir: str | Path, model: str, unet, text_encoder, vae, tokenizer,
                       revision: str | None = None, variant: str | None = None, components=None) -> Path:
    """A diffusers pipeline dir (safetensors) of the model's family with the trained UNet (and text
    encoders, and the run's VAE); ``components``: the run's (SDXL: its second text encoder)."""
    family = family_of(components) if components is not None else family_named("sd1")
    parts = {"unet": unet, "text_encoder": text_encoder, "vae": vae, "tokenizer": tokenizer}
    if components is not None:
        parts = family.pipeline_parts(dataclasses.replace(components, **parts))
    else:
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = family.pipeline_class().from_pretrained(model, **parts, revision=revision, variant=variant)
    pipe.save_pretrained(str(output_dir), safe_serialization=True)
    return Path(output_dir)
