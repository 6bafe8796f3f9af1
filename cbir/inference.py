"""Inference backends: prepared images (uint8, N × H × W × 3) → L2-normalised vectors, by PyTorch or ONNX Runtime.

Every command that embeds gets its encoder from :func:`load_encoder` (the HTTP service too). An encoder is called on
a batch of prepared images (:func:`cbir.images.prepare`) and returns float32 vectors; ``describe()`` is what the
database records and checks (the extractor, its weights, the backend and the precision).

* ``onnx`` (the default wherever the model exports): ONNX Runtime, fp32, or int8 after ``cbir-export --int8``.
  A valid ONNX file (see :mod:`cbir.export`) is used without importing PyTorch at all.
* ``torch``: eager PyTorch in inference mode, channels-last for convolutional models, fp16 autocast on a GPU
  (fp32 again for a checkpoint whose vectors overflow in half precision).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from cbir.errors import CbirError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "torch", "onnx")


def available_cores() -> int:
    """Cores this process may run on (a container's or taskset's share, not the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def gpu_present() -> bool:
    """An NVIDIA GPU, probed without importing torch (which takes seconds)."""
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/nvidia0")


def default_batch_size(encoder) -> int:
    """Images per forward pass, from the hardware: on a CPU a few per thread (larger batches only cost cache);
    on a GPU enough to fill it, by its memory."""
    device = getattr(encoder, "device", "cpu")
    if str(device).startswith("cuda"):
        import torch

        gib = torch.cuda.get_device_properties(torch.device(device)).total_memory / 2**30
        return int(min(512, max(32, 8 * gib)))
    return int(min(64, max(16, 8 * available_cores())))


class TorchEncoder:
    """An :class:`~cbir.models.Extractor` in eager PyTorch. ``owned=False`` (an extractor still training) leaves
    the module's memory layout alone."""

    backend = "torch"

    def __init__(self, extractor, *, weights: str | None = None, device=None, owned: bool = True):
        import torch

        from cbir.models import prefers_channels_last

        self.device = torch.device(device) if device is not None else pick_device()
        self.model = extractor.to(self.device).eval()
        self.config = extractor.config
        self.weights = weights
        self.half = self.device.type == "cuda"
        self.precision = "fp16" if self.half else "fp32"
        # Convolutions run faster on NHWC tensors; the uint8 batches arrive NHWC, so it costs no copy.
        self.channels_last = owned and prefers_channels_last(extractor)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        mean = torch.tensor(self.config["mean"], dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        std = torch.tensor(self.config["std"], dtype=torch.float32, device=self.device).view(1, 3, 1, 1)
        self._scale, self._shift = 1.0 / (255.0 * std), mean / std
        self._extractor = extractor
        self._info = None

    input_size = property(lambda self: int(self.config["input_size"]))
    embedding_size = property(lambda self: int(self.config["embedding_size"]))

    def __call__(self, images: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device, non_blocking=True)
            x = x.permute(0, 3, 1, 2).float() * self._scale - self._shift
            if not self.channels_last:
                x = x.contiguous()
            if self.half:
                with torch.autocast("cuda", dtype=torch.float16):
                    vectors = self.model(x).float()
                if torch.isfinite(vectors).all():
                    return vectors.cpu().numpy()
                log.warning("half precision overflows for this checkpoint: embedding in fp32 from now on")
                self.half, self.precision = False, "fp32"
            return self.model(x).float().cpu().numpy()

    def describe(self) -> dict:
        if self._info is None:
            self._info = {**self._extractor.describe(), "weights": _resolved(self.weights)}
        return {**self._info, "backend": self.backend, "precision": self.precision}


class OnnxEncoder:
    """An exported extractor in ONNX Runtime (CPU, or CUDA where onnxruntime-gpu is installed)."""

    backend = "onnx"

    def __init__(self, session, metadata: dict, *, weights: str | None = None):
        self.session = session
        self.config = metadata["config"]
        self.precision = metadata["precision"]
        self.weights = weights
        self.device = "cuda" if "CUDAExecutionProvider" in session.get_providers() else "cpu"
        self._info = {**metadata["extractor"], "weights": _resolved(weights)}

    input_size = property(lambda self: int(self.config["input_size"]))
    embedding_size = property(lambda self: int(self.config["embedding_size"]))

    def __call__(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"images": np.ascontiguousarray(images, dtype=np.uint8)})[0]

    def describe(self) -> dict:
        return {**self._info, "backend": self.backend, "precision": self.precision}


def pick_device(gpu_id: int | None = None):
    import torch

    if torch.cuda.is_available():
        return torch.device(f"cuda:{gpu_id or 0}")
    return torch.device("cpu")


def _resolved(weights) -> str | None:
    return str(Path(weights).resolve()) if weights else None


def open_session(path: str | os.PathLike, threads: int | None = None, *, spin: bool = True):
    """An ONNX Runtime session using every core this process has (one pool of intra-op threads).

    ``spin``: between operators, idle threads spin instead of sleeping — faster for batches (95 against 84 images/s
    on 2 cores), but a server answering one image at a time leaves them spinning after every request, on cores its
    other work (and other processes) need; it passes False.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or available_cores()
    options.inter_op_num_threads = 1
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # its own warnings are not the user's business
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # noqa: BLE001 — a damaged or foreign file: the caller exports again or says so
        log.debug("cannot open %s: %s", path, exc)
        return None


def _valid_onnx(path: Path, sha: str, precision: str, threads: int | None, spin: bool = True):
    """(session, metadata) of an ONNX file exported from the checkpoint with hash ``sha``; None otherwise."""
    from cbir.export import read_metadata

    if not path.is_file():
        return None
    session = open_session(path, threads, spin=spin)
    metadata = read_metadata(session) if session is not None else None
    if metadata is None or metadata.get("checkpoint_sha256") != sha or metadata.get("precision") != precision:
        return None
    return session, metadata


def _resolve_backend(backend: str | None) -> str:
    if backend in (None, "auto"):
        # On a GPU without onnxruntime-gpu, PyTorch in half precision beats ONNX Runtime on the CPU.
        if gpu_present():
            import onnxruntime as ort

            return "onnx" if "CUDAExecutionProvider" in ort.get_available_providers() else "torch"
        return "onnx"
    if backend not in BACKENDS:
        raise CbirError(f"unknown --backend '{backend}'; choose one of: {', '.join(BACKENDS)}")
    return backend


def load_encoder(weights: str | os.PathLike | None = None, *, backend: str | None = None, int8: bool = False,
                 model: str | None = None, num_features: int | None = None, dr_model: bool | None = None,
                 extractor=None, device=None, threads: int | None = None, spin: bool = True):
    """The encoder of a checkpoint (or of an already built ``extractor``, e.g. a frozen backbone).

    ``backend``: ``auto`` (ONNX where the model exports, falling back to PyTorch with one line), ``torch`` or
    ``onnx``. ``int8`` uses the quantised model ``cbir-export --int8`` wrote beside the checkpoint.
    ``model`` / ``num_features`` / ``dr_model`` are checked against the checkpoint, as ``load_extractor`` does.
    ``threads`` / ``spin``: of the ONNX Runtime session (see :func:`open_session`).
    """
    from cbir.export import beside, cache_dir, export_onnx, file_sha256

    chosen = _resolve_backend(backend)
    if int8 and chosen != "onnx":
        raise CbirError("int8 runs in ONNX Runtime: use --backend onnx (or leave --backend out) with --int8")
    if weights is None and extractor is None:
        raise CbirError("give --weights CHECKPOINT (from cbir-train), or --extractor NAME --num_features 0 for "
                        "frozen ImageNet features")
    if weights is not None and not Path(weights).is_file():
        raise CbirError(f"weights file {weights} does not exist; train one with cbir-train --weights {weights}")

    def torch_encoder():
        built = extractor if extractor is not None else _load_extractor(weights, model, num_features, dr_model)
        return TorchEncoder(built, weights=weights, device=device)

    if chosen == "torch":
        return torch_encoder()

    precision = "int8" if int8 else "fp32"
    if weights is not None:
        sha = file_sha256(weights)
        exported = beside(weights, precision)
        found = _valid_onnx(exported, sha, precision, threads, spin)
        if found is None and exported.is_file():
            log.warning("%s was exported from other weights than %s: ignored (run cbir-export --weights %s%s)",
                        exported, weights, weights, " --int8" if int8 else "")
        if found is None and int8:
            raise CbirError(f"no int8 model for {weights}: run cbir-export --weights {weights} --int8 "
                            "--calibration_data TRAINING_FOLDER first (it calibrates on a few hundred images)")
        if found is not None:
            session, metadata = found
            check_flags(metadata["config"], weights, model=model, num_features=num_features, dr_model=dr_model)
            return OnnxEncoder(session, metadata, weights=weights)
        key = sha
    else:
        # No file to hash: the weights' fingerprint and the configuration (input size, head) name the export.
        key = hashlib.sha256(json.dumps([extractor.describe(), extractor.config], sort_keys=True).encode()).hexdigest()
    cached = cache_dir() / f"{key[:40]}.onnx"
    failed = cached.with_suffix(".failed")
    found = None if failed.exists() else _valid_onnx(cached, key, "fp32", threads, spin)
    if found is None:
        built = extractor if extractor is not None else _load_extractor(weights, model, num_features, dr_model)
        if not failed.exists():
            info = {**built.describe(), "weights": _resolved(weights)}
            try:
                log.info("exporting '%s' to ONNX once (cached in %s)", built.config["model"], cached.parent)
                export_onnx(built, cached, checkpoint_sha256=key, info=info)
                found = _valid_onnx(cached, key, "fp32", threads, spin)
            except CbirError as exc:
                failed.write_text(str(exc) + "\n")
        if found is None:
            reason = failed.read_text().strip() if failed.exists() else "ONNX Runtime could not open the export"
            if backend == "onnx":
                raise CbirError(f"{reason}; use --backend torch")
            log.warning("%s: using the torch backend", reason)
            return TorchEncoder(built, weights=weights, device=device)
    session, metadata = found
    if weights is not None:
        check_flags(metadata["config"], weights, model=model, num_features=num_features, dr_model=dr_model)
    return OnnxEncoder(session, metadata, weights=weights)


def recorded_encoder(recorded: dict | None, *, weights: str | os.PathLike | None = None, frozen: str | None = None,
                     backend: str | None = None, int8: bool | None = None, device=None, spin: bool = True,
                     **checks):
    """The encoder of a database's vectors: ``recorded`` is what the database records (``db.extractor``, None for an
    empty one), ``weights`` a checkpoint and ``frozen`` a backbone name (frozen ImageNet features) given instead.

    ``backend`` / ``int8`` left as None take the backend and precision the database was built with; ``checks``
    (``model``, ``num_features``, ``dr_model``) are checked against the checkpoint, as :func:`load_encoder` does.
    """
    recorded = recorded or {}
    backend = backend or recorded.get("backend")
    if int8 is None:  # as the database was built, unless a backend without int8 was asked for
        int8 = recorded.get("precision") == "int8" and backend != "torch"
    weights = weights or (None if frozen else recorded.get("weights"))
    if weights:
        return load_encoder(weights, backend=backend, int8=int8, device=device, spin=spin, **checks)
    name = frozen or recorded.get("name")
    if not name:
        raise CbirError("give --weights CHECKPOINT (from cbir-train), or --extractor NAME --num_features 0 for "
                        "frozen ImageNet features")
    from cbir.models import create_extractor

    return load_encoder(extractor=create_extractor(name, 0, pretrained=True).eval(), backend=backend, int8=int8,
                        device=device, spin=spin)


def _load_extractor(weights, model, num_features, dr_model):
    from cbir.models import load_extractor

    return load_extractor(weights, model=model, num_features=num_features, dr_model=dr_model)


def check_flags(config: dict, path, *, model=None, num_features=None, dr_model=None) -> None:
    """Refuse settings that contradict the configuration a checkpoint (or its export) carries."""
    from cbir.errors import ParameterError

    for name, given, stored in (
        ("model", model, config["model"]),
        ("num_features", num_features, config["embedding_size"]),
        ("dr_model", dr_model, bool(config.get("dr_model"))),
    ):
        if given is not None and given != stored:
            raise ParameterError(f"{path} holds a '{config['model']}' extractor with {{{name}}} {stored}, not "
                                 f"{given}; drop {{{name}}} (the checkpoint carries its own configuration)", name)


def as_encoder(extractor_or_encoder, device=None):
    """An encoder as is; a bare :class:`~cbir.models.Extractor` (training's validation) wrapped for PyTorch."""
    if hasattr(extractor_or_encoder, "describe") and hasattr(extractor_or_encoder, "backend"):
        return extractor_or_encoder
    return TorchEncoder(extractor_or_encoder, device=device, owned=False)
