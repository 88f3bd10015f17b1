"""The `erstore` command line: parse options, call one library function, print.

Every command exits non-zero with a one-line error (naming the problem and the fix) on bad
input; `--json` gives machine-readable output for scripts.
"""

from __future__ import annotations

import functools
import json
import sys
from typing import Any, Callable

import click

from erstore.errors import ErstoreError


def _errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ErstoreError as e:
            click.echo(f"error: {e}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:
            click.echo("interrupted: committed versions are intact; rerun to resume", err=True)
            sys.exit(130)

    return wrapper


def _remote(endpoint: str | None, region: str | None) -> dict[str, str]:
    """Location options for object storage (only those given; the rest come from AWS_* variables)."""
    return {k: v for k, v in (("endpoint", endpoint), ("region", region)) if v}


def _remote_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--region", default=None, help="S3 region [default: $AWS_REGION or us-east-1].")(fn)
    return click.option("--endpoint", default=None,
                        help="S3-compatible endpoint URL [default: $AWS_ENDPOINT_URL or AWS].")(fn)


def _version(value: str | None) -> int | str | None:
    """A --version value: a number, or a tag name (see `erstore tag`)."""
    return int(value) if value is not None and value.isdigit() else value


def _print(data: Any, as_json: bool, text: str) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True) if as_json else text)


@click.group()
@click.version_option(package_name="erstore")
def main() -> None:
    """Store transformer hidden states once; train and serve reduced models on them."""


@main.command()
@click.option("--model", default=None, help="Model folder or name [default: packaged all-MiniLM-L6-v2].")
@click.option("--layer", "layers", type=int, multiple=True,
              help="hidden_states index k to store (repeatable) [default: the middle layer].")
@click.option("--corpus", default=None, help="JSONL or text file [default: built-in stdlib docstrings].")
@click.option("--store", default=None, help="Store path or s3:// URL [default: ./stores/MODEL-lK]. "
              "With several --layer values, a folder holding layer-K stores.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float16",
              show_default=True)
@click.option("--codec", default="lossless", show_default=True,
              help="lossless | shuffle (byte-shuffled lossless) | int8[:scales=token|channel|both] | "
              "int4[:group=64]; lossless forms store --dtype.")
@click.option("--max-length", type=int, default=None, help="Tokens per window [default: min(512, model limit)].")
@click.option("--stride", type=int, default=None, help="Overlap between windows [default: max-length/4].")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="torch device for the forward pass.")
@click.option("--text-field", default="text", show_default=True)
@click.option("--pair-field", default=None, help="JSONL field holding a second text (QA contexts).")
@click.option("--id-field", default=None, help="JSONL field holding a document id [default: line number].")
@click.option("--limit", type=int, default=None, help="Use only the first N documents.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@click.option("--endpoint", default=None, help="S3-compatible endpoint URL [default: $AWS_ENDPOINT_URL or AWS].")
@click.option("--region", default=None, help="S3 region [default: $AWS_REGION or us-east-1].")
@_errors
def build(**opts: Any) -> None:
    """Run a model over a corpus once and store layer-k hidden states as a new version."""
    from erstore.builder import BuildConfig, build as run
    from erstore.corpus import DEFAULT_CORPUS
    from erstore.tokenize import DEFAULT_MODEL

    if opts["batch_size"] < 1:
        raise click.BadParameter("must be at least 1", param_hint="--batch-size")
    config = BuildConfig(
        model=opts["model"] or DEFAULT_MODEL, layers=tuple(opts["layers"]),
        corpus=opts["corpus"] or DEFAULT_CORPUS, store=opts["store"], dtype=opts["dtype"], codec=opts["codec"],
        max_length=opts["max_length"], stride=opts["stride"], batch_size=opts["batch_size"],
        device=opts["device"], text_field=opts["text_field"], pair_field=opts["pair_field"],
        id_field=opts["id_field"], limit=opts["limit"], progress=not opts["quiet"],
        store_options=_remote(opts.pop("endpoint"), opts.pop("region")),
    )
    for result in run(config):
        click.echo(result.summary())


@main.command()
@click.argument("path")
@click.option("--version", default=None, help="Version number or tag to describe [default: newest].")
@click.option("--json", "as_json", is_flag=True)
@_remote_options
@_errors
def info(path: str, version: str | None, as_json: bool, endpoint: str | None, region: str | None) -> None:
    """Recipe, versions, counts and bytes of a store."""
    from erstore.store import Store

    with Store(path, version=_version(version), **_remote(endpoint, region)) as store:
        data = store.info()
    r = data["recipe"]
    text = "\n".join([
        f"store      {data['store']}",
        f"version    {data['version']} of {data['versions'][-1] if data['versions'] else 0}",
        f"model      {r['model_name']} ({r['model_type']}, {r['num_layers']} layers, d={r['hidden_size']})",
        f"           weights {r['model_fingerprint']}",
        f"layer      {r['layer']} (hidden_states index)",
        f"tokenizer  {r['tokenizer_fingerprint']}, max_length {r['max_length']}, stride {r['stride']}",
        f"codec      {r['codec']['name']} "
        + " ".join(f"{k}={v}" for k, v in sorted(r["codec"].items()) if k != "name"),
        f"holds      {data['sequences']} sequences, {data['tokens']} tokens, {data['bytes'] / 1e6:.1f} MB",
    ])
    _print(data, as_json, text)


@main.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True)
@_remote_options
@_errors
def versions(path: str, as_json: bool, endpoint: str | None, region: str | None) -> None:
    """List committed versions: number, time, what each added."""
    from dataclasses import asdict

    from erstore.store import Store

    with Store(path, **_remote(endpoint, region)) as store:
        manifests = store.versions()
    rows = [asdict(m) for m in manifests]
    lines = [f"{'version':>7}  {'created':29}  {'+sequences':>10}  {'+tokens':>9}  {'sequences':>9}"]
    lines += [f"{m.version:>7}  {m.created:29}  {m.added.sequences:>10}  {m.added.tokens:>9}  "
              f"{m.totals.sequences:>9}" for m in manifests]
    _print(rows, as_json, "\n".join(lines))


@main.command()
@click.argument("path")
@click.option("--version", default=None, help="Version number or tag [default: newest].")
@click.option("--json", "as_json", is_flag=True)
@_remote_options
@_errors
def verify(path: str, version: str | None, as_json: bool, endpoint: str | None, region: str | None) -> None:
    """Check every sequence against its write-time checksum; exit 1 on corruption."""
    from erstore.store import Store
    from erstore.verify import verify as run

    with Store(path, version=_version(version), **_remote(endpoint, region)) as store:
        report = run(store)
    lines = [f"{c['key']}: {c['problem']}" for c in report.corrupt]
    lines.append(f"{'OK' if report.ok else 'CORRUPT'}: checked {report.checked} sequences, "
                 f"{len(report.corrupt)} corrupt (version {report.version})")
    _print(report.to_dict(), as_json, "\n".join(lines))
    if not report.ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
