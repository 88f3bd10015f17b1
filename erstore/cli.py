"""The `erstore` command line: parse options, call one library function, print.

Every command exits non-zero with a one-line error (naming the problem and the fix) on bad
input; `--json` gives machine-readable output for scripts.
"""

from __future__ import annotations

import os
import signal
import sys


def _interrupted_at_start(signum: int, frame: object) -> None:
    # Ctrl-C while Python, torch, TensorStore or transformers are still importing: a
    # KeyboardInterrupt there surfaces as a traceback or as an ImportError from a C extension.
    # Nothing has been written yet, so leave at once with one line.
    os.write(2, b"interrupted during start-up; nothing was written\n")
    os._exit(130)


# Only when run as the `erstore` command (not when imported as a library, e.g. by tests).
if (os.path.basename(sys.argv[0]) if sys.argv else "") in ("erstore", "erstore.exe") \
        and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _interrupted_at_start)  # until a command has imported what it needs

import functools
import json
from typing import Any, Callable

import click

from erstore.errors import ErstoreError
from erstore.progress import cli_mode


def _started() -> None:
    """Back to KeyboardInterrupt (handled by `_errors`) once start-up imports are done."""
    if signal.getsignal(signal.SIGINT) is _interrupted_at_start:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            if fn.__name__ != "build":  # build restores it after its imports
                _started()
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


def _quiet_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--quiet", is_flag=True, help="No progress output on stderr.")(fn)


def _version(value: str | None) -> int | str | None:
    """A --version value: a number, or a tag name (see `erstore tag`)."""
    return int(value) if value is not None and value.isdigit() else value


def _print(data: Any, as_json: bool, text: str) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=True) if as_json else text)


#: Entry-point group of commands that other packages add (`erstore choose` comes from
#: erstore_consumers): erstore itself never imports them until one is run.
COMMANDS_GROUP = "erstore.commands"


class _Commands(click.Group):
    """erstore's own commands plus those declared in the `erstore.commands` entry points."""

    def _plugins(self) -> dict[str, Any]:
        from importlib.metadata import entry_points

        return {ep.name: ep for ep in entry_points(group=COMMANDS_GROUP) if ep.name not in self.commands}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*self.commands, *self._plugins()])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.commands:
            return self.commands[name]
        ep = self._plugins().get(name)
        if ep is None:
            return None
        try:
            command = ep.load()
        except ImportError as e:
            raise click.ClickException(
                f"`erstore {name}` needs {ep.value.split(':')[0]}, which cannot be imported ({e}); "
                "install it with: pip install 'erstore[consumers]'"
            ) from e
        return click.Command(name, callback=command.callback, params=command.params, help=command.help,
                             short_help=(command.help or "").split("\n")[0])


@click.group(cls=_Commands, epilog="Distributed builds: torchrun --nproc-per-node N -m erstore.distributed "
             "BUILD-OPTIONS (the options of `erstore build`; see docs/sharing.md). Progress goes to stderr: a "
             "bar on a terminal, else a plain line every ERSTORE_PROGRESS_SECONDS (10); "
             "ERSTORE_PROGRESS=bar|lines|off forces a mode; --quiet turns it off.")
@click.version_option(package_name="erstore")
def main() -> None:
    """Store transformer hidden states once; train and serve reduced models on them."""


@main.command()
@click.option("--model", default=None, help="Model folder or name [default: packaged all-MiniLM-L6-v2].")
@click.option("--layer", "layers", type=int, multiple=True,
              help="hidden_states index k to store (repeatable) [default: the middle layer].")
@click.option("--corpus", default=None,
              help="Corpus file, folder or glob: JSONL, text, CSV/TSV, Parquet, Arrow (optionally .gz/.zst), "
              "or a datasets save_to_disk folder [default: built-in stdlib docstrings].")
@click.option("--format", "corpus_format", default=None,
              type=click.Choice(["jsonl", "text", "csv", "tsv", "parquet", "arrow", "datasets"]),
              help="Corpus format of every file [default: by extension].")
@click.option("--store", default=None, help="Store path or s3:// URL [default: ./stores/MODEL-lK]. "
              "With several --layer values, a folder holding layer-K stores.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default="float16",
              show_default=True)
@click.option("--codec", default="lossless", show_default=True,
              help="lossless | shuffle (byte-shuffled lossless) | int8[:scales=token|channel|both] | "
              "int4[:group=64] | entropy[:step=0.2]; lossless forms store --dtype "
              "(see docs/codecs.md).")
@click.option("--max-length", type=int, default=None,
              help="Tokens per window [default: min(512, model limit); a sentence-transformers model's "
              "max_seq_length].")
@click.option("--stride", type=int, default=None, help="Overlap between windows [default: max-length/4].")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--device", default="cpu", show_default=True, help="torch device for the forward pass.")
@click.option("--text-field", default="text", show_default=True)
@click.option("--pair-field", default=None, help="Field (key or column) holding a second text (QA contexts).")
@click.option("--id-field", default=None, help="Field holding a document id [default: line or row number].")
@click.option("--words-field", default=None,
              help="Field holding a list of words (NER); the text is the words joined by spaces if absent.")
@click.option("--limit", type=int, default=None, help="Use only the first N documents.")
@click.option("--quiet", is_flag=True, help="No progress output on stderr (see `erstore --help`).")
@click.option("--buffer-tokens", type=click.IntRange(min=1), default=None,
              help="Tokens of new windows held for length batching; bounds build memory [default: 1048576].")
@click.option("--endpoint", default=None, help="S3-compatible endpoint URL [default: $AWS_ENDPOINT_URL or AWS].")
@click.option("--region", default=None, help="S3 region [default: $AWS_REGION or us-east-1].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per store instead of a summary.")
@_errors
@click.pass_context
def build(ctx: click.Context, **opts: Any) -> None:
    """Run a model over a corpus once and store layer-k hidden states as a new version."""
    # The slow imports of start-up, while a Ctrl-C still means "exit with one line".
    import tensorstore  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from erstore.builder import BuildConfig
    from erstore.builder import build as single_process

    _started()
    run = (ctx.obj or {}).get("build", single_process)  # erstore.distributed passes its own
    from erstore.corpus import DEFAULT_CORPUS
    from erstore.tokenize import DEFAULT_MODEL

    if opts["batch_size"] < 1:
        raise click.BadParameter("must be at least 1", param_hint="--batch-size")
    config = BuildConfig(
        model=opts["model"] or DEFAULT_MODEL, layers=tuple(opts["layers"]),
        corpus=opts["corpus"] or DEFAULT_CORPUS, store=opts["store"], dtype=opts["dtype"], codec=opts["codec"],
        max_length=opts["max_length"], stride=opts["stride"], batch_size=opts["batch_size"],
        device=opts["device"], text_field=opts["text_field"], pair_field=opts["pair_field"],
        id_field=opts["id_field"], limit=opts["limit"], progress=cli_mode(quiet=opts["quiet"], as_json=opts["as_json"]),
        format=opts["corpus_format"], words_field=opts["words_field"],
        store_options=_remote(opts.pop("endpoint"), opts.pop("region")),
        **({"buffer_tokens": opts["buffer_tokens"]} if opts["buffer_tokens"] else {}),
        tune_malloc=True,  # this process only builds: see BuildConfig.tune_malloc
    )
    results = run(config)
    if opts["as_json"]:
        click.echo(json.dumps([r.to_dict() for r in results], indent=2, sort_keys=True))
    else:
        for result in results:
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
        "reads      verified (checksums on every file and chunk)" if data["verified_reads"]
        else f"reads      UNVERIFIED: {data['note']}",
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
@_quiet_option
@_remote_options
@_errors
def verify(path: str, version: str | None, as_json: bool, quiet: bool, endpoint: str | None,
           region: str | None) -> None:
    """Check every sequence against its write-time checksum; exit 1 on corruption."""
    from erstore.store import Store
    from erstore.verify import verify as run

    with Store(path, version=_version(version), **_remote(endpoint, region)) as store:
        report = run(store, progress=cli_mode(quiet=quiet, as_json=as_json))
    lines = [f"{c['key']}: {c['problem']}" for c in report.corrupt]
    lines.append(f"{'OK' if report.ok else 'CORRUPT'}: checked {report.checked} sequences, "
                 f"{len(report.corrupt)} corrupt (version {report.version})")
    _print(report.to_dict(), as_json, "\n".join(lines))
    if not report.ok:
        sys.exit(1)



# -- sharing across teams: tags, diff, copy, gc, catalog, cost (library: erstore.manage, erstore.cost)
@main.command()
@click.argument("path")
@click.argument("version")
@click.argument("name")
@click.option("--force", is_flag=True, help="Move an existing tag.")
@click.option("--json", "as_json", is_flag=True)
@_remote_options
@_errors
def tag(path: str, version: str, name: str, force: bool, as_json: bool, endpoint: str | None,
        region: str | None) -> None:
    """Name VERSION of a store NAME; open it later with --version NAME / erstore.open(version=NAME)."""
    from erstore.manage import tag as run

    number = run(path, _version(version), name, force=force, **_remote(endpoint, region))
    _print({"store": path, "tag": name, "version": number}, as_json, f"tagged version {number} of {path} as {name!r}")


@main.command()
@click.argument("path")
@click.argument("a")
@click.argument("b")
@click.option("--keys", "show_keys", is_flag=True, help="List the keys, not only the counts.")
@click.option("--json", "as_json", is_flag=True)
@_remote_options
@_errors
def diff(path: str, a: str, b: str, show_keys: bool, as_json: bool, endpoint: str | None,
         region: str | None) -> None:
    """Keys added and removed between versions (or tags) A and B."""
    from erstore.manage import diff as run

    d = run(path, _version(a), _version(b), **_remote(endpoint, region))
    lines = [f"version {d.a} -> {d.b}: +{len(d.added)} added, -{len(d.removed)} removed"]
    if show_keys:
        lines += [f"+ {k}" for k in d.added] + [f"- {k}" for k in d.removed]
    _print(d.to_dict(), as_json, "\n".join(lines))


@main.command()
@click.argument("src")
@click.argument("dst")
@click.option("--version", default=None, help="Version number or tag of SRC [default: newest].")
@click.option("--keys", "keys_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="File with one key per line: copy only these sequences.")
@click.option("--endpoint", default=None, help="S3 endpoint for both stores [default: $AWS_ENDPOINT_URL].")
@click.option("--region", default=None, help="S3 region for both stores [default: $AWS_REGION].")
@click.option("--src-endpoint", default=None, help="S3 endpoint of SRC only.")
@click.option("--dst-endpoint", default=None, help="S3 endpoint of DST only.")
@click.option("--json", "as_json", is_flag=True)
@_quiet_option
@_errors
def copy(src: str, dst: str, version: str | None, keys_file: str | None, endpoint: str | None,
         region: str | None, src_endpoint: str | None, dst_endpoint: str | None, as_json: bool, quiet: bool) -> None:
    """Copy a version (or a key subset) of SRC into DST as one new version, keeping keys and recipe."""
    from pathlib import Path

    from erstore.manage import copy as run

    keys = [k.strip() for k in Path(keys_file).read_text().splitlines() if k.strip()] if keys_file else None
    manifest = run(src, dst, version=_version(version), keys=keys,
                   src_options=_remote(src_endpoint or endpoint, region),
                   dst_options=_remote(dst_endpoint or endpoint, region), progress=cli_mode(quiet=quiet, as_json=as_json))
    data = {"store": dst, "version": None if manifest is None else manifest.version,
            "added_sequences": 0 if manifest is None else manifest.added.sequences,
            "added_tokens": 0 if manifest is None else manifest.added.tokens}
    if manifest is None:
        _print(data, as_json, f"{dst} already holds every requested sequence; no version committed")
    else:
        _print(data, as_json, f"copied {manifest.added.sequences} sequences ({manifest.added.tokens} tokens) "
                              f"to {dst} as version {manifest.version}")


@main.command(name="export")
@click.argument("path")
@click.option("--format", "fmt", type=click.Choice(["parquet", "safetensors", "npz"]), required=True,
              help="parquet: one row per sequence; safetensors: a folder of shards; npz: one file.")
@click.option("--out", "-o", default=None,
              help="Output file (folder for safetensors) [default: ./<store>-v<version>.<format>].")
@click.option("--version", default=None, help="Version number or tag [default: newest].")
@click.option("--keys", "keys_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="File with one key per line: export only these sequences.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output.")
@click.option("--json", "as_json", is_flag=True)
@_quiet_option
@_remote_options
@_errors
def export_command(path: str, fmt: str, out: str | None, version: str | None, keys_file: str | None,
                   overwrite: bool, as_json: bool, quiet: bool, endpoint: str | None, region: str | None) -> None:
    """Write keys, token ids and decoded states of a version to Parquet, safetensors or npz (streaming)."""
    from pathlib import Path

    from erstore.builder import slug
    from erstore.export import CACHE_BYTES
    from erstore.export import export as run
    from erstore.store import Store

    keys = [k.strip() for k in Path(keys_file).read_text().splitlines() if k.strip()] if keys_file else None
    with Store(path, version=_version(version), cache_bytes=CACHE_BYTES, **_remote(endpoint, region)) as store:
        target = out or f"{slug(path)}-v{store.version or 0}.{fmt}"
        r = run(store, target, format=fmt, keys=keys, overwrite=overwrite,
                progress=cli_mode(quiet=quiet, as_json=as_json))
    _print(r.to_dict(), as_json, f"exported {r.sequences} sequences ({r.tokens} tokens) of version {r.version} "
           f"to {r.path} ({len(r.files)} file{'s' if len(r.files) != 1 else ''})")


@main.command()
@click.argument("path")
@click.option("--keep", multiple=True, help="Version number or tag to keep (repeatable).")
@click.option("--keep-last", type=int, default=None, help="Keep the newest N versions.")
@click.option("--grace-hours", type=float, default=24.0 * 7, show_default=True,
              help="Never delete builds that wrote anything this recently (they may still be running).")
@click.option("--dry-run", is_flag=True, help="Only report what would be deleted and freed.")
@click.option("--json", "as_json", is_flag=True)
@_quiet_option
@_remote_options
@_errors
def gc(path: str, keep: tuple[str, ...], keep_last: int | None, grace_hours: float, dry_run: bool,
       as_json: bool, quiet: bool, endpoint: str | None, region: str | None) -> None:
    """Reclaim space no kept version needs. Without --keep/--keep-last every version is kept.

    Tagged versions and the newest version are always kept. Dropped versions can no longer be
    opened; kept versions are unchanged.
    """
    from erstore.manage import gc as run

    if keep_last is not None and keep_last < 1:
        raise click.BadParameter("must be at least 1", param_hint="--keep-last")
    r = run(path, keep=list(keep), keep_last=keep_last, dry_run=dry_run, grace_hours=grace_hours,
            progress=cli_mode(quiet=quiet, as_json=as_json), **_remote(endpoint, region))
    verb = "would free" if dry_run else "freed"
    lines = [f"kept versions {r.kept_versions}; {'would drop' if dry_run else 'dropped'} {r.dropped_versions}"]
    lines += [f"{'would delete' if dry_run else 'deleted'} dead build {b}" for b in r.deleted_builds]
    lines += [f"skipped unreferenced build {b} (newer than --grace-hours; may be running)" for b in r.recent_builds]
    lines.append(f"{verb} {r.freed_bytes} bytes ({r.freed_bytes / 1e6:.2f} MB)")
    _print(r.to_dict(), as_json, "\n".join(lines))


@main.command(name="ls")
@click.argument("root")
@click.option("--json", "as_json", is_flag=True)
@_remote_options
@_errors
def ls_command(root: str, as_json: bool, endpoint: str | None, region: str | None) -> None:
    """List the stores under a folder or s3://bucket/prefix: recipe, versions, size."""
    from erstore.manage import ls as run

    rows = run(root, **_remote(endpoint, region))
    lines = [f"{'store':40}  {'model':24}  {'layer':>5}  {'codec':18}  {'versions':>8}  {'sequences':>9}  {'MB':>9}"]
    for r in rows:
        codec = f"{r['codec'].get('name', '?')} {r['codec'].get('dtype', '')}".strip()
        tagged = f" tags: {', '.join(f'{k}={v}' for k, v in sorted(r['tags'].items()))}" if r["tags"] else ""
        lines.append(f"{r['store']:40}  {r['model'][-24:]:24}  {r['layer']:>5}  {codec:18}  "
                     f"{(r['versions'] or [0])[-1]:>8}  {r['sequences']:>9}  {r['bytes'] / 1e6:>9.2f}{tagged}")
    if not rows:
        lines = [f"no stores under {root}"]
    _print(rows, as_json, "\n".join(lines))


@main.command()
@click.argument("path")
@click.option("--version", default=None, help="Version number or tag [default: newest].")
@click.option("--price-per-hour", type=float, default=None,
              help="$ per hour of the build device [default: 0.10 for cpu, 2.00 for an accelerator].")
@click.option("--price-per-gb-month", type=float, default=0.023, show_default=True,
              help="$ per GB-month of storage (S3 Standard).")
@click.option("--tokens-per-second", type=float, default=None,
              help="Throughput of layers 0..k-1 [default: measured by the store's builds].")
@click.option("--tokens", type=int, default=None, help="Corpus size to cost [default: the store's tokens].")
@click.option("--json", "as_json", is_flag=True)
@_remote_options
@_errors
def cost(path: str, version: str | None, price_per_hour: float | None, price_per_gb_month: float,
         tokens_per_second: float | None, tokens: int | None, as_json: bool, endpoint: str | None,
         region: str | None) -> None:
    """How often must the corpus be reprocessed for storing layer k to pay off? (paper, appendix A.8)"""
    from erstore.cost import estimate

    e = estimate(path, version=_version(version), price_per_hour=price_per_hour,
                 price_per_gb_month=price_per_gb_month, tokens_per_second=tokens_per_second, tokens=tokens,
                 **_remote(endpoint, region))
    _print(e.to_dict(), as_json, e.text())


if __name__ == "__main__":
    main()
