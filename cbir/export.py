"""An extractor checkpoint as an ONNX model (fp32, or int8 by static quantisation), with what proves its origin.

The exported graph takes what the decoding workers produce — ``uint8`` images, N × H × W × 3 — and does the
normalisation itself, so workers ship a quarter of the bytes and no backend repeats the preprocessing. Each file
carries, as ONNX metadata (key ``cbir``), the SHA-256 of the checkpoint it came from, the extractor's description
(the database compares it) and its configuration: a file exported from other weights is recognised as stale, and a
command that finds a valid file never needs to build the PyTorch model.

Where the files live (see :func:`cbir.inference.load_encoder`): ``cbir-export`` writes ``m.onnx`` / ``m.int8.onnx``
beside ``m.pt``. Without it, the fp32 model is exported on first use into a private cache keyed by the checkpoint's
content (``$CBIR_CACHE``, default ``~/.cache/cbir``): the export needs nothing but the checkpoint and takes seconds,
and a content key can never be stale. int8 needs calibration images, so it is made only by ``cbir-export --int8``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

from cbir.errors import CbirError

log = logging.getLogger(__name__)

METADATA_KEY = "cbir"
EXPORT_FORMAT = 1
OPSET = 17


def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_dir() -> Path:
    """The private folder of first-use exports (mode 0700: the files derive from the user's weights)."""
    root = Path(os.environ.get("CBIR_CACHE") or Path.home() / ".cache" / "cbir").expanduser()
    folder = root / "onnx"
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)
    return folder


def beside(weights: str | os.PathLike, precision: str) -> Path:
    """Where ``cbir-export`` puts the ONNX model of ``weights``: ``m.onnx`` or ``m.int8.onnx`` beside ``m.pt``."""
    weights = Path(weights)
    return weights.with_name(weights.stem + (".int8.onnx" if precision == "int8" else ".onnx"))


def _graph(extractor):
    """The extractor behind uint8 N×H×W×3 input: cast, scale to [0, 1], normalise, NCHW."""
    import torch
    from torch import nn

    class PreparedImages(nn.Module):
        def __init__(self):
            super().__init__()
            self.extractor = extractor
            mean = torch.tensor(extractor.config["mean"], dtype=torch.float32).view(1, 3, 1, 1)
            std = torch.tensor(extractor.config["std"], dtype=torch.float32).view(1, 3, 1, 1)
            self.register_buffer("scale", 1.0 / (255.0 * std), persistent=False)
            self.register_buffer("shift", mean / std, persistent=False)

        def forward(self, images):
            x = images.permute(0, 3, 1, 2).float()
            return self.extractor(x * self.scale - self.shift)

    return PreparedImages().eval()


@contextlib.contextmanager
def _silenced_output():
    """The TorchScript exporter prints the whole graph from C++ when an operator fails: not the user's business
    (the exception says what failed)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 1)
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def _write_metadata(path: Path, metadata: dict) -> None:
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata, sort_keys=True)
    onnx.save(model, str(path))


def _atomic_target(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(handle)
    return Path(tmp)


def export_onnx(extractor, path: str | os.PathLike, *, checkpoint_sha256: str, info: dict) -> Path:
    """Write the fp32 ONNX model of ``extractor`` to ``path`` atomically; :class:`CbirError` when it does not export.

    ``info`` is the extractor's description (what the database records), stored with the checkpoint's hash.
    """
    import torch

    path = Path(path)
    size = int(extractor.config["input_size"])
    example = torch.zeros(2, size, size, 3, dtype=torch.uint8)
    tmp = _atomic_target(path)
    # PyTorch's fused attention kernel (the "fast path" of nn.MultiheadAttention in eval mode) has no ONNX form;
    # the plain path computes the same thing.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad(), _silenced_output():
            warnings.simplefilter("ignore")
            # The TorchScript exporter: a few seconds for a CNN, where the dynamo one took 30 s on 2 cores.
            torch.onnx.export(_graph(extractor), (example,), str(tmp), input_names=["images"],
                              output_names=["vectors"], opset_version=OPSET, dynamo=False,
                              dynamic_axes={"images": {0: "batch"}, "vectors": {0: "batch"}})
        metadata = {"format": EXPORT_FORMAT, "checkpoint_sha256": checkpoint_sha256, "precision": "fp32",
                    "extractor": info, "config": extractor.config}
        _write_metadata(tmp, metadata)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except CbirError:
        raise
    except Exception as exc:  # noqa: BLE001 — any exporter failure means "this model does not export"
        raise CbirError(f"'{extractor.config['model']}' does not export to ONNX "
                        f"({exc.__class__.__name__}: {str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ''})") from None
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        tmp.unlink(missing_ok=True)
    return path


def read_metadata(session) -> dict | None:
    """The ``cbir`` metadata of an ONNX Runtime session's model; None for a file we did not write."""
    raw = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    try:
        metadata = json.loads(raw) if raw else None
    except ValueError:
        return None
    return metadata if isinstance(metadata, dict) and metadata.get("format") == EXPORT_FORMAT else None


def calibration_samples(samples: list, count: int, seed: int = 0) -> list:
    """``count`` images drawn evenly over the classes (seeded), for int8 calibration."""
    rng = random.Random(seed)
    by_class: dict[str, list] = {}
    for sample in samples:
        by_class.setdefault(sample.class_name, []).append(sample)
    for members in by_class.values():
        rng.shuffle(members)
    picked, round_no = [], 0
    while len(picked) < count and any(round_no < len(m) for m in by_class.values()):
        picked += [m[round_no] for _, m in sorted(by_class.items()) if round_no < len(m)]
        round_no += 1
    return picked[:count]


def _kept_in_float(model) -> list[str]:
    """Nodes left in fp32: the input's scaling before the first convolution, that convolution, the last matrix
    product (the head) and the L2 normalisation after it. On histo-bench images with EfficientNet-Lite0 this
    raised the worst cosine to fp32 from 0.86 to 0.90 for 10% of the int8 speed-up."""
    nodes = list(model.graph.node)
    compute = [i for i, n in enumerate(nodes) if n.op_type in ("Conv", "Gemm", "MatMul")]
    if not compute:
        return []
    first, last = compute[0], compute[-1]
    return [n.name for n in nodes[: first + 1]] + [n.name for n in nodes[last:]]


def quantize_int8(fp32_path: str | os.PathLike, path: str | os.PathLike, batches) -> Path:
    """Static int8 quantisation (QDQ, per-channel weights, MinMax activations) of an exported fp32 model.

    ``batches`` yields uint8 N×H×W×3 arrays of calibration images (a few hundred training images). Weights use
    7 bits (``reduce_range``): x86 CPUs without VNNI multiply uint8 by int8 into saturating 16-bit sums, which
    with full-range weights dropped EfficientNet-Lite0's worst cosine to fp32 to 0.56 on this project's machines.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(batches)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {"images": batch}

    import onnx

    fp32_path, path = Path(fp32_path), Path(path)
    metadata = {entry.key: entry.value for entry in onnx.load(str(fp32_path), load_external_data=False).metadata_props}
    source = json.loads(metadata[METADATA_KEY])
    tmp = _atomic_target(path)
    with tempfile.TemporaryDirectory() as work:
        prepared = Path(work) / "prepared.onnx"
        # Shape inference and graph folding first, as ONNX Runtime's quantisation guide asks.
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=False)
        # ONNX Runtime's quantiser warns on the root logger for every tensor it leaves alone: hundreds of lines.
        logging.disable(logging.WARNING)
        try:
            quantize_static(str(prepared), str(tmp), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            reduce_range=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            # ONNX Runtime keeps every activation of every calibration image until the end
                            # (DenseNet121 on 300 images: over 10 GB); its CalibMaxIntermediateOutputs option
                            # would bound that but, in 1.32, drops the ranges it collected instead of merging them.
                            nodes_to_exclude=_kept_in_float(onnx.load(str(prepared))))
            _write_metadata(tmp, {**source, "precision": "int8"})
            os.chmod(tmp, 0o600)
            os.replace(tmp, path)
        finally:
            logging.disable(logging.NOTSET)
            tmp.unlink(missing_ok=True)
    return path


def export_checkpoint(weights: str | os.PathLike, *, int8: bool = False, calibration: list | None = None,
                      calibration_batch: int = 16, workers: int | None = None) -> list[Path]:
    """``cbir-export``: the fp32 model beside the checkpoint, and with ``int8`` the quantised one too.

    ``calibration``: the samples to calibrate int8 on (see :func:`calibration_samples`).
    """
    from cbir.models import load_extractor

    weights = Path(weights)
    extractor = load_extractor(weights)
    sha = file_sha256(weights)
    info = {**extractor.describe(), "weights": str(weights.resolve())}
    written = [export_onnx(extractor, beside(weights, "fp32"), checkpoint_sha256=sha, info=info)]
    if int8:
        if not calibration:
            raise CbirError("--int8 calibrates on training images: give --calibration_data FOLDER")
        from cbir.embedding import iter_prepared

        batches = (images for _, images in iter_prepared(calibration, int(extractor.config["input_size"]),
                                                           batch_size=calibration_batch, num_workers=workers))
        written.append(quantize_int8(written[0], beside(weights, "int8"), batches))
    return written
