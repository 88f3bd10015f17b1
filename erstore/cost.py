"""`erstore cost`: does storing layer-k states pay off, for this store's measured numbers?

Method (the embedding-recycling paper's appendix A.8): keeping the states costs storage every
month; every time the corpus is processed again (a training epoch, a new task, a sweep run), the
store saves running layers 0..k-1 over it. Recycling pays off when the corpus is reprocessed
more often per month than

    break_even = storage $/month / compute $ saved per reprocessing
    storage $/month = stored GB * $ per GB-month
    compute $ saved per reprocessing = tokens / (layers 0..k-1 tokens per second) / 3600 * $ per hour

The throughput is what the store's own builds measured (`build.computed_tokens` over the
`build.seconds.compute` phase of each version manifest); a build runs exactly layers 0..k-1,
so it is the compute that reading the store replaces. Not modelled: the cost of reading the
states back (I/O time, egress), and the upper layers, which run either way.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from erstore.errors import InvalidInputError
from erstore.store import Store

DEFAULT_GB_MONTH = 0.023  # S3 Standard, us-east-1, first 50 TB
DEFAULT_HOUR = {"cpu": 0.10, "accelerator": 2.00}  # a small CPU instance / one cloud GPU


@dataclass(frozen=True)
class CostEstimate:
    store: str
    version: int | None
    layer: int
    tokens: int
    stored_gb: float
    tokens_per_second: float
    device: str
    price_per_hour: float
    price_per_gb_month: float
    storage_per_month: float
    compute_per_pass: float
    break_even_passes_per_month: float
    measured_from: list[int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def text(self) -> str:
        every = 30.0 / self.break_even_passes_per_month if self.break_even_passes_per_month else float("inf")
        return "\n".join([
            f"store        {self.store} (version {self.version}, layer {self.layer})",
            "assumptions:",
            f"  corpus       {self.tokens:,} tokens, {self.stored_gb:.4f} GB stored",
            f"  throughput   {self.tokens_per_second:,.0f} tokens/s for layers 0..{self.layer - 1} on "
            f"{self.device} (measured by builds of versions {self.measured_from})",
            f"  prices       ${self.price_per_hour:.4f} per {self.device}-hour, "
            f"${self.price_per_gb_month:.4f} per GB-month",
            "  ignored      reading the states back (I/O, egress) and the upper layers (run either way)",
            f"storage      ${self.storage_per_month:.6f} per month",
            f"compute      ${self.compute_per_pass:.6f} saved per reprocessing of the corpus",
            f"break-even   {self.break_even_passes_per_month:.4g} reprocessings per month "
            f"(recycling pays off if the corpus is reprocessed more than once every {every:.4g} days)",
        ])


def estimate(url: str, *, version: int | str | None = None, price_per_hour: float | None = None,
             price_per_gb_month: float = DEFAULT_GB_MONTH, tokens_per_second: float | None = None,
             tokens: int | None = None, **options: Any) -> CostEstimate:
    """Estimate the break-even reprocessing rate of a store version (see the module docstring).

    `tokens` scales the estimate to a corpus of another size (bytes per token as measured);
    `tokens_per_second` replaces the measured throughput (e.g. for another device).
    Raises InvalidInputError if no build of the store measured its throughput and none is given.
    """
    with Store(url, version=version, **options) as store:
        manifests = [m for m in store.versions() if store.version is not None and m.version <= store.version]
        latest = store.manifest
        measured = [(m.version, m.build) for m in manifests
                    if m.build.get("computed_tokens") and (m.build.get("seconds") or {}).get("compute")]
        if tokens_per_second is None:
            if not measured:
                raise InvalidInputError(f"no build of {url} recorded its throughput (copied store?); "
                                        "pass --tokens-per-second")
            done = sum(b["computed_tokens"] for _, b in measured)
            seconds = sum(b["seconds"]["compute"] for _, b in measured)
            tokens_per_second = done / seconds
        if tokens_per_second <= 0:
            raise InvalidInputError("tokens per second must be positive")
        devices = sorted({str(b.get("device", "cpu")) for _, b in measured}) or ["unknown"]
        device = devices[0] if len(devices) == 1 else "+".join(devices)
        if price_per_hour is None:
            price_per_hour = DEFAULT_HOUR["cpu" if device == "cpu" else "accelerator"]
        stored_tokens = latest.totals.tokens if latest else 0
        stored_bytes = latest.totals.bytes if latest else 0
        n = stored_tokens if tokens is None else int(tokens)
        gb = (stored_bytes * n / stored_tokens if stored_tokens else 0.0) / 1e9
        storage = gb * price_per_gb_month
        compute = n / tokens_per_second / 3600.0 * price_per_hour
        return CostEstimate(
            store=store.location.url, version=store.version, layer=store.recipe.layer, tokens=n,
            stored_gb=gb, tokens_per_second=float(tokens_per_second), device=device,
            price_per_hour=float(price_per_hour), price_per_gb_month=float(price_per_gb_month),
            storage_per_month=storage, compute_per_pass=compute,
            break_even_passes_per_month=storage / compute if compute else float("inf"),
            measured_from=[v for v, _ in measured],
        )
