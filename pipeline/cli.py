"""The `kd` command: parse flags (or --config YAML), build a stage config, call the stage.

Nothing here computes anything; errors the user can fix arrive as KDError and leave as one
line on stderr with a non-zero exit status.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import click

from pipeline.errors import KDError


def _load_config(ctx: click.Context, param: click.Parameter, value: str | None):
    """--config FILE.yaml: its keys become defaults of this command's flags (flags win)."""
    if not value:
        return value
    import yaml

    try:
        with open(value, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise click.BadParameter(f"cannot read {value}: {str(exc).splitlines()[0]}", param_hint="--config")
    if not isinstance(data, dict):
        raise click.BadParameter(f"{value} must hold a mapping of flag names to values", param_hint="--config")
    names = {p.name for p in ctx.command.params if p.name}
    norm = {str(k).replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(norm) - names - {"config"})
    if unknown:
        valid = ", ".join(sorted(n.replace("_", "-") for n in names if n != "config"))
        raise click.BadParameter(f"unknown key(s) {', '.join(unknown)} in {value}; valid keys: {valid}", param_hint="--config")
    ctx.default_map = {**(ctx.default_map or {}), **norm}
    return value


def config_option(f):
    return click.option("--config", type=click.Path(dir_okay=False), is_eager=True, expose_value=False,
                        callback=_load_config, help="YAML file whose keys mirror this command's flags (flags win).")(f)


class KDGroup(click.Group):
    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        """Like click's standalone mode, but every error is exactly one line on stderr."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.ClickException as exc:
            hint = " (see --help)" if isinstance(exc, click.UsageError) else ""
            click.echo(f"Error: {exc.format_message()}{hint}", err=True)
            sys.exit(exc.exit_code)
        except (click.Abort, KeyboardInterrupt):
            click.echo("Error: interrupted", err=True)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KDError as exc:
            raise click.ClickException(str(exc)) from None
        except (click.exceptions.Exit, click.ClickException, click.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:  # a bug: keep it to one line unless asked
            if os.environ.get("KD_DEBUG"):
                traceback.print_exc()
            msg = str(exc).splitlines()[0] if str(exc) else ""
            raise click.ClickException(f"internal error {type(exc).__name__}: {msg} (rerun with KD_DEBUG=1 for the traceback)") from None


@click.group(cls=KDGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="kd-pipeline")
def cli():
    """kd — offline knowledge distillation: a teacher runs once, students stream its cached soft targets."""


TASK_TYPES = click.Choice(["sequence-classification", "token-classification", "masked-lm", "causal-lm"])


@cli.command()
@config_option
@click.option("--model", required=True, help="Teacher: a local directory or a hub id.")
@click.option("--data", required=True, help="A .jsonl/.json/.csv/.parquet/.txt file or glob, a save_to_disk directory, or a hub dataset.")
@click.option("--split", default="train", show_default=True)
@click.option("--task-type", required=True, type=TASK_TYPES)
@click.option("--text-column", default=None, help="Default: text (tokens for token-classification).")
@click.option("--text-pair-column", default=None, help="Second text of a pair (sequence-classification).")
@click.option("--label-column", default=None, help="Default: label / ner_tags where present.")
@click.option("--id-column", default=None, help="Default: id where present, else the row index.")
@click.option("--max-length", default=512, show_default=True, type=int)
@click.option("--top-k", default=32, show_default=True, type=int)
@click.option("--temperature", default=1.0, show_default=True, type=float)
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
              help="Teacher compute dtype (auto: bf16 on a GPU, float32 on the CPU).")
@click.option("--value-dtype", default="float16", show_default=True, type=click.Choice(["float16", "float32"]),
              help="Stored dtype of topk_logits.")
@click.option("--batch-tokens", default=16384, show_default=True, type=int, help="Token budget per teacher batch (padded).")
@click.option("--shard-rows", default=None, type=int, help="Rows per shard (default: 50000 for classification, 1M/max-length otherwise).")
@click.option("--mask-seed", default=0, show_default=True, type=int, help="masked-lm: seed of the masks.")
@click.option("--mask-prob", default=0.15, show_default=True, type=float, help="masked-lm: masking probability.")
@click.option("--out", default=None, help="Output directory (with --cache-root: a symlink to the keyed cache).")
@click.option("--task-index", default=None, type=int, help="This task's index (default: from SLURM/PBS/LSF/SGE array variables, else 0).")
@click.option("--num-tasks", default=None, type=int, help="Number of array tasks (default: from the array variables, else 1).")
@click.option("--cache-root", default=None, help="Keep the cache at CACHE_ROOT/<key> so other runs reuse it.")
@click.option("--limit", default=None, type=int, help="Use only the first N rows.")
@click.option("--device", default="auto", show_default=True)
def teacher(**kw):
    """Stage 1: run the teacher once and cache its top-k soft targets as Parquet shards."""
    from stages.teacher import TeacherConfig, run

    result = run(TeacherConfig(**kw))
    click.echo(json.dumps(result))


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False))
def finalize(directory):
    """Merge the task records of DIRECTORY into manifest.json (refuses while tasks are missing)."""
    from pipeline import manifest

    m = manifest.finalize(directory)
    click.echo(f"wrote {os.path.join(directory, manifest.MANIFEST)}: {len(m['files'])} files, {m['stats'].get('rows', 0)} rows")


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
@click.option("--check", is_flag=True, help="Exit with status 1 unless the output is complete.")
def status(directory, as_json, check):
    """Which tasks of DIRECTORY are done and which are missing."""
    from pipeline import manifest

    st = manifest.status(directory)
    if as_json:
        click.echo(json.dumps(st))
    else:
        state = "complete" if st["complete"] else ("ready to finalize" if not st["missing"] else "incomplete")
        click.echo(f"{directory}: {st['kind']} {st['key'][:12]} — {state}; {len(st['done'])}/{st['num_tasks']} tasks done")
        if st["missing"]:
            click.echo("missing tasks: " + ",".join(map(str, st["missing"])))
    if check and not st["complete"]:
        sys.exit(1)


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True)
def inspect(directory, as_json):
    """Summary of a targets cache: rows, positions, bytes/position, tail mass, entropy."""
    from pipeline.inspection import summarize

    s = summarize(directory)
    if as_json:
        click.echo(json.dumps(s))
    else:
        for k, v in s.items():
            click.echo(f"{k:>22}: {v}")


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--recompute", default=0, show_default=True, type=int, help="Re-run the teacher on N random rows and compare.")
@click.option("--model", default=None, help="Teacher for --recompute (default: the one in the manifest).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="float32", show_default=True, type=click.Choice(["auto", "float32", "bfloat16", "float16"]))
def verify(directory, recompute, model, seed, device, dtype):
    """Check every shard's sha256 against the manifest; optionally recompute a sample."""
    from pipeline.inspection import verify as run_verify

    click.echo(run_verify(directory, recompute=recompute, model=model, seed=seed, device=device, dtype=dtype))


def main():
    cli(prog_name="kd")


if __name__ == "__main__":
    main()
