"""The in-process limit: what the served model does without HTTP. Images/s of encode, decode and reconstruct at
batch 1, 8, 64 and 256 through the server's own predictor (service.predictor.VAEPredictor.predict, the call its
worker thread makes), of a prior sample (VAEPredictor.predict("sample"): the prior's noise -> z -> image, through
model.priors), the cost per image of splitting a multipart body (service.multipart.parse), of turning a PNG
upload into the model's input (the server's path, VAEPredictor.inline_image: libspng for a PNG at the model's size,
else Pillow; then stack_images), of writing encode's JSON answer (VAEPredictor.encode_response, then
service.rendering.json_response)
and of turning an output into a base64 PNG, and the bulk pipeline (256 PNGs decoded, then one forward pass): the
ceiling for a bulk /v1/encode request. The binary path likewise: a raw uint8 tensor body into the model's input
(service.decoding.read_tensor and wire_images, then VAEPredictor.images_tensor), encode's tensor answer
(encode_response, then service.rendering.tensor_response), and its bulk pipeline (a (256, C, H, W) uint8 body into
the input, then one forward pass).

    python bench/inprocess.py --checkpoint checkpoints/mnist                 # torch's default threads, as served
    python bench/inprocess.py --checkpoint checkpoints/mnist --threads 1
    python bench/inprocess.py --checkpoint checkpoints/mnist --device cuda   # skips cleanly without CUDA

Each figure is the best of --rounds rounds, a round being as many calls as fit in --seconds (at least one, at most
--max-calls), so a run takes about rounds x seconds x rows. Prints one table.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench import loadgen  # noqa: E402
from model.device import resolve_device  # noqa: E402
from service import decoding, multipart  # noqa: E402
from service.predictor import Job, VAEPredictor  # noqa: E402
from service.rendering import image_fields, json_response, tensor_response  # noqa: E402
from service.schemas import Call, EncodeRequest  # noqa: E402

BATCHES = (1, 8, 64, 256)
OPS = ("encode", "decode", "reconstruct")


@dataclass
class Timing:
    label: str
    batch: int
    seconds_per_call: float

    @property
    def images_per_s(self) -> float:
        return self.batch / self.seconds_per_call

    @property
    def us_per_image(self) -> float:
        return self.seconds_per_call / self.batch * 1e6


def best_seconds_per_call(fn: Callable[[], object], seconds: float, rounds: int, max_calls: int) -> float:
    """The fastest round's time per call (rounds of as many calls as fit in `seconds`)."""
    fn()  # warm-up: lazy initialisation, allocator
    best = float("inf")
    for _ in range(rounds):
        calls = 0
        started = time.perf_counter()
        while True:
            fn()
            calls += 1
            elapsed = time.perf_counter() - started
            if elapsed >= seconds or calls >= max_calls:
                break
        best = min(best, elapsed / calls)
    return best


def load_predictor(checkpoint: str | Path, device: str = "cpu", threads: int | None = None) -> VAEPredictor:
    """The checkpoint as the server loads it; `threads` as the server's --cpu-threads (None: torch's choice)."""
    if threads:
        torch.set_num_threads(threads)
    path = Path(checkpoint).resolve()
    predictor = VAEPredictor.load(path.name, path, resolve_device(device))
    predictor.warmup()
    return predictor


def forward_inputs(p: VAEPredictor, op: str, n: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand((n, *p.input_shape), generator=generator)
    if op == "decode":
        return {"z": p.noise(n, generator)}
    if op == "reconstruct":
        return {"x": x, "eps": p.noise(n, generator)}
    return {"x": x}


def prior_sample(p: VAEPredictor, n: int) -> torch.Tensor:
    """n prior samples as the server draws them: seeded noise from the model's prior (model.priors), then one
    forward of the predictor's sample op (the prior's transform, e.g. a flow's inverse, and the decoder's mean)."""
    noise = p.prior_noise(n, torch.Generator().manual_seed(0))
    return p.predict("sample", {"eps": noise, "temperature": torch.ones(n)})["image"]


def upload_tensor(p: VAEPredictor, uploads: list[bytes]) -> torch.Tensor:
    """The server's own path for uploaded files that are converted on the event loop (VAEPredictor.images)."""
    return p.stack_images([p.inline_image(data, "image") for data in uploads])  # type: ignore[misc]


def encode_answer(p: VAEPredictor, out: dict[str, torch.Tensor]) -> bytes:
    """Encode's answer as the server writes it."""
    return bytes(json_response(p.encode_response(Job("encode", {}), out, Call(EncodeRequest()))).body)


def digit_pixels(p: VAEPredictor) -> np.ndarray:
    """The benchmark's digit as uint8 pixels (C, H, W) at the model's size: the PNG's own pixels."""
    c, h, w = p.input_shape
    return loadgen.digit_pixels((w, h), c)


def tensor_input(p: VAEPredictor, body: bytes, shape: list[int]) -> torch.Tensor:
    """The server's own path for a raw uint8 tensor body (service.decoding, then VAEPredictor.images)."""
    return p.images_tensor(decoding.wire_images(decoding.read_tensor(body, shape, "uint8")))


def encode_tensor_answer(p: VAEPredictor, out: dict[str, torch.Tensor]) -> bytes:
    """Encode's tensor answer as the server writes it."""
    call = Call(EncodeRequest(), format="tensor")
    return bytes(tensor_response(p.encode_response(Job("encode", {}), out, call), None).body)


def measure(
    p: VAEPredictor, png: bytes, seconds: float, rounds: int, max_calls: int, batches: tuple[int, ...] = BATCHES
) -> list[Timing]:
    """Every row of the table, in order."""

    def timed(label: str, batch: int, fn: Callable[[], object]) -> Timing:
        return Timing(label, batch, best_seconds_per_call(fn, seconds, rounds, max_calls))

    rows = []
    for op in OPS:
        for n in batches:
            inputs = forward_inputs(p, op, n)
            rows.append(timed(f"{op} forward", n, lambda op=op, inputs=inputs: p.predict(op, inputs)))
    for n in batches:
        rows.append(timed("sample: prior noise -> z -> image", n, lambda n=n: prior_sample(p, n)))
    for n in (1, max(batches)):
        content_type, body = loadgen.multipart_body([png] * n)
        rows.append(
            timed("multipart body -> parts", n, lambda c=content_type, b=body, n=n: multipart.parse(c, b, max_parts=n))
        )
    for n in (1, max(batches)):
        rows.append(timed("PNG upload -> input tensor", n, lambda n=n: upload_tensor(p, [png] * n)))
    for n in (1, max(batches)):
        pixels = np.repeat(digit_pixels(p)[None], n, axis=0)
        body, shape = pixels.tobytes(), list(pixels.shape)
        rows.append(timed("uint8 tensor body -> input tensor", n, lambda b=body, s=shape: tensor_input(p, b, s)))
    for n in (1, max(batches)):
        out = p.predict("encode", forward_inputs(p, "encode", n))
        rows.append(timed("encode output -> JSON answer", n, lambda out=out: encode_answer(p, out)))
        rows.append(timed("encode output -> tensor answer", n, lambda out=out: encode_tensor_answer(p, out)))
    images = p.predict("decode", forward_inputs(p, "decode", max(batches)))["image"]
    rows.append(timed("output -> base64 PNG", 1, lambda: image_fields(images[:1], "png")))
    rows.append(bulk_limit(p, png, max(batches), seconds, rounds, max_calls))
    rows.append(bulk_tensor_limit(p, digit_pixels(p), max(batches), seconds, rounds, max_calls))
    return rows


def bulk_limit(
    p: VAEPredictor, png: bytes, n: int = 256, seconds: float = 0.3, rounds: int = 3, max_calls: int = 100_000
) -> Timing:
    """The in-process ceiling of a bulk /v1/encode request of n PNGs (decode them, one forward pass)."""
    uploads = [png] * n
    fn = lambda: p.predict("encode", {"x": upload_tensor(p, uploads)})  # noqa: E731
    return Timing("bulk encode: PNGs -> input -> forward", n, best_seconds_per_call(fn, seconds, rounds, max_calls))


def bulk_tensor_limit(
    p: VAEPredictor, pixels: np.ndarray, n: int = 256, seconds: float = 0.3, rounds: int = 3, max_calls: int = 100_000
) -> Timing:
    """The in-process ceiling of a bulk /v1/encode request whose raw body is `pixels` (C, H, W) n times, uint8
    (the body into the model's input, one forward pass)."""
    batch = np.repeat(pixels[None], n, axis=0)
    body, shape = batch.tobytes(), list(batch.shape)
    fn = lambda: p.predict("encode", {"x": tensor_input(p, body, shape)})  # noqa: E731
    label = "bulk encode: uint8 tensor -> input -> forward"
    return Timing(label, n, best_seconds_per_call(fn, seconds, rounds, max_calls))


def report(rows: list[Timing]) -> str:
    cells = [[r.label, r.batch, f"{r.images_per_s:,.0f}", f"{r.us_per_image:.2f}"] for r in rows]
    return loadgen.table(["what", "batch", "images/s", "µs/image"], cells)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--checkpoint", default="checkpoints/mnist", help="checkpoint directory")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (CUDA absent: prints why and skips)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's, as served)")
    p.add_argument("--seconds", type=float, default=0.3, help="length of one timing round")
    p.add_argument("--rounds", type=int, default=3, help="rounds per figure (the best is kept)")
    p.add_argument("--max-calls", type=int, default=100_000, help="most calls in one round")
    p.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    args = p.parse_args(argv)
    if loadgen.cuda_missing(args.device):
        return
    predictor = load_predictor(args.checkpoint, args.device, args.threads)
    c, h, w = predictor.input_shape
    png = loadgen.digit_png((w, h), c)
    rows = measure(predictor, png, args.seconds, args.rounds, args.max_calls, tuple(args.batches))
    device = torch.cuda.get_device_name(predictor.device) if predictor.device.type == "cuda" else "CPU"
    print(
        f"\n{predictor.name} on {device}, torch threads {torch.get_num_threads()}, {len(png)}-byte PNG; "
        f"{loadgen.machine()}\n"
    )
    print(report(rows))


if __name__ == "__main__":
    main()
