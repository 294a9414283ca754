"""The `kd` command: parse flags (or --config YAML), build a stage config, call the stage.

Nothing here computes anything; errors the user can fix arrive as KDError and leave as one
line on stderr with a non-zero exit status.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

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

    if os.path.exists(os.path.join(directory, manifest.MANIFEST)):  # e.g. the array's last task wrote it
        click.echo(f"{directory} is already complete ({manifest.MANIFEST} exists); nothing to do")
        return
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


@cli.command(name="eval")
@config_option
@click.option("--model", "model", multiple=True, required=True, help="A student (any model directory); repeat for several.")
@click.option("--data", default=None, help="The labelled split's data (as for kd teacher); with --targets optional and checked against the cache.")
@click.option("--split", default="test", show_default=True)
@click.option("--targets", default=None, help="Targets cache of this split: teacher metrics and comparisons without rerunning the teacher.")
@click.option("--teacher", default=None, help="Teacher model: without --targets it runs here once (cached under OUT/targets); with --targets it is only timed.")
@click.option("--task-type", default=None, type=TASK_TYPES, help="Default: from the cache, the students' manifests or their configs.")
@click.option("--text-column", default=None, help="Without --targets: default text (tokens for token-classification).")
@click.option("--text-pair-column", default=None)
@click.option("--label-column", default=None, help="Default: label / ner_tags where present.")
@click.option("--id-column", default=None)
@click.option("--max-length", default=None, type=int, help="Default: the cache's, else 512.")
@click.option("--top-k", default=32, show_default=True, type=int, help="k of the targets when --teacher runs here.")
@click.option("--mask-seed", default=0, show_default=True, type=int, help="masked-lm without --targets: seed of the masks.")
@click.option("--mask-prob", default=0.15, show_default=True, type=float)
@click.option("--batch-size", default=32, show_default=True, type=int, help="Rows per forward (and the batch of the examples/s figure).")
@click.option("--timing-examples", default=64, show_default=True, type=int, help="Rows each model is timed on.")
@click.option("--time-teacher/--no-time-teacher", default=True, show_default=True, help="Load the cache's teacher to measure its size and speed.")
@click.option("--limit", default=None, type=int, help="Use only the first N rows.")
@click.option("--device", default="auto", show_default=True)
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "float32", "bfloat16", "float16"]))
@click.option("--out", required=True, help="Output directory: metrics.parquet, report.md, plot.png, manifest.json.")
def eval_(**kw):
    """Stage 3: score students on a labelled split and against the teacher, with their size and speed."""
    from stages.evaluate import EvalConfig, run

    result = run(EvalConfig(**{**kw, "model": list(kw["model"])}))
    click.echo(result["report"])
    click.echo(result["table"])


from pipeline.slurm import slurm_group  # noqa: E402  (cheap: click only)

cli.add_command(slurm_group, "slurm")


@cli.command()
@config_option
@click.option("--targets", default=None, help="A complete targets cache (absent: plain fine-tuning on --data with cross-entropy).")
@click.option("--data", default=None, help="Without --targets: the dataset to fine-tune on (as for `kd teacher`).")
@click.option("--split", default="train", show_default=True)
@click.option("--task-type", default=None, type=TASK_TYPES, help="Without --targets: the task (with --targets it comes from the cache).")
@click.option("--text-column", default=None)
@click.option("--text-pair-column", default=None)
@click.option("--label-column", default=None)
@click.option("--labels", default=None, help="Without --targets: label names in id order, e.g. neg,pos (default: from the data).")
@click.option("--max-length", default=512, show_default=True, type=int, help="Without --targets: tokenisation length.")
@click.option("--limit", default=None, type=int, help="Without --targets: use only the first N rows.")
@click.option("--student", default=None, help="The student: a local directory or a hub id.")
@click.option("--student-from-teacher", default=None, metavar="MODEL", help="Cut the student from this teacher (with --student-layers).")
@click.option("--student-layers", default=None, help="Teacher layers the student keeps, e.g. 0,2,4.")
@click.option("--alpha", default=0.5, show_default=True, type=float, help="Loss = alpha*T^2*KD + (1-alpha)*CE on hard labels.")
@click.option("--temperature", default=None, type=float, help="Training temperature (default: the cache's).")
@click.option("--loss", default="kl", show_default=True, type=click.Choice(["kl", "kl-renorm", "reverse-kl", "jsd"]))
@click.option("--epochs", default=3, show_default=True, type=int)
@click.option("--max-steps", default=None, type=int, help="Stop after N optimizer steps (overrides --epochs).")
@click.option("--lr", default=5e-5, show_default=True, type=float)
@click.option("--batch-size", default=32, show_default=True, type=int, help="Rows per micro-batch (per process).")
@click.option("--grad-accum", default=1, show_default=True, type=int, help="Micro-batches per optimizer step.")
@click.option("--warmup-ratio", default=0.0, show_default=True, type=float)
@click.option("--weight-decay", default=0.01, show_default=True, type=float)
@click.option("--max-grad-norm", default=1.0, show_default=True, type=float, help="Gradient clipping (0: off).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--dtype", default="auto", show_default=True, type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
              help="Autocast dtype (weights stay float32); auto: bf16 on a GPU, float32 on the CPU.")
@click.option("--save-every", default=500, show_default=True, type=int, help="Checkpoint every N steps (0: never).")
@click.option("--out", default=None, help="Output directory of the student.")
@click.option("--eval-targets", default=None, help="A held-out targets cache: report validation KD loss and agreement.")
@click.option("--sweep", default=None, help="YAML/JSON list of overrides; trains entry --task-index into OUT/<name>.")
@click.option("--task-index", default=None, type=int, help="Sweep entry (default: from SLURM/PBS/LSF/SGE array variables).")
@click.option("--num-workers", default=1, show_default=True, type=int, help="DataLoader worker processes per rank.")
@click.option("--shuffle-buffer", default=None, type=int, help="Rows kept back for shuffling across row groups (default: a row group's worth).")
@click.option("--device", default="auto", show_default=True)
def train(**kw):
    """Stage 2: train a student from a targets cache (stage 0 without one); resumes from its checkpoints."""
    from stages.train import TrainConfig, run

    result = run(TrainConfig(**kw))
    if result is not None:  # rank 0 only under torchrun
        click.echo(json.dumps(result))


@cli.command("run")
@click.argument("pipeline_file", type=click.Path(dir_okay=False))
@click.option("--workdir", default=None, help="Where every output goes (default: the YAML's workdir, else runs/<file name>).")
@click.option("--dry-run", is_flag=True, help="Check the YAML and print the steps without running them.")
def run_pipeline(pipeline_file, workdir, dry_run):
    """Run every stage named in PIPELINE_FILE in order, reusing outputs that are complete and match."""
    from stages.run import run

    result = run(pipeline_file, workdir=workdir, dry_run=dry_run)
    if result.get("report"):
        click.echo(Path(result["report"]).read_text())


@cli.command()
@click.option("--workdir", default="runs/demo", show_default=True)
@click.option("--quick", is_flag=True, help="A reduced run (few rows and steps): what CI runs.")
def demo(workdir, quick):
    """The embedded default: fine-tune MiniLM on Rotten Tomatoes, cache it, distil a 3-layer student, evaluate."""
    from stages.run import demo as run_demo

    result = run_demo(workdir, quick=quick)
    report = Path(result["report"])
    click.echo(report.read_text())
    click.echo(f"report: {report}\nplot:   {report.parent / 'plot.png'}\n"
               f"({len(result['ran'])} steps ran, {len(result['reused'])} reused, {result['seconds']} s)")


def main():
    cli(prog_name="kd")


if __name__ == "__main__":
    main()
