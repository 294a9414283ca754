"""The `kd` command: parse flags (or --config YAML), build a stage config, call the stage.

Nothing here computes anything; errors the user can fix arrive as KDError and leave as one
line on stderr with a non-zero exit status.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import traceback
from pathlib import Path

import click

from pipeline import config, slurm
from pipeline.errors import KDError, one_line


def _load_config(ctx: click.Context, param: click.Parameter, value: str | None):
    """--config FILE.yaml: its keys become defaults of this command's flags (flags win)."""
    if not value:
        return value
    try:
        data = config.load_yaml(value, "--config") or {}
        norm = config.normalize_keys(data, value)
        config.check_keys(norm, {p.name for p in ctx.command.params if p.name and p.name != "config"}, value)
    except KDError as exc:
        raise click.BadParameter(str(exc), param_hint="--config") from None
    repeatable = {p.name for p in ctx.command.params if getattr(p, "multiple", False)}
    for k in repeatable & norm.keys():  # `targets: DIR` means one of a repeatable flag
        if isinstance(norm[k], (str, int, float)):
            norm[k] = [norm[k]]
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
            click.echo(f"Error: {one_line(exc.format_message())}{hint}", err=True)
            sys.exit(exc.exit_code)
        except (click.Abort, KeyboardInterrupt):
            click.echo("Error: interrupted", err=True)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KDError as exc:
            raise click.ClickException(one_line(str(exc))) from None
        except (click.exceptions.Exit, click.ClickException, click.Abort, KeyboardInterrupt):
            raise
        except Exception as exc:  # a bug: keep it to one line unless asked
            if os.environ.get("KD_DEBUG"):
                traceback.print_exc()
            msg = one_line(str(exc), 300)
            raise click.ClickException(f"internal error {type(exc).__name__}: {msg} (rerun with KD_DEBUG=1 for the traceback)") from None


@click.group(cls=KDGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="kd-pipeline")
def cli():
    """kd — offline knowledge distillation: a teacher runs once, students stream its cached soft targets."""


def _click_type(f: dataclasses.Field):
    if f.metadata.get("choices"):
        return click.Choice(list(f.metadata["choices"]))
    annotation = str(f.type)
    return int if "int" in annotation else float if "float" in annotation else str


def options_from(cls):
    """The click options of a stage config's fields (pipeline.config is their one definition)."""
    def decorate(fn):
        for f in reversed(config.flags(cls)):
            meta, default = f.metadata, (None if f.default is dataclasses.MISSING else f.default)
            decls = [f"{config.flag_name(f)}/{meta['secondary']}" if meta.get("secondary") else config.flag_name(f), f.name]
            kw = {"help": meta.get("help", ""), "show_default": default is not None and default != ()}
            if meta.get("secondary") is None:
                kw["type"] = _click_type(f)
            for k in ("required", "multiple", "metavar"):
                if meta.get(k):
                    kw[k] = meta[k]
            fn = click.option(*decls, default=default, **kw)(fn)
        return config_option(fn)
    return decorate


@cli.command(help=config.TeacherConfig.__doc__)
@options_from(config.TeacherConfig)
def teacher(**kw):
    from stages.teacher import run

    click.echo(json.dumps(run(config.build(config.TeacherConfig, kw, "kd teacher"))))


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


@cli.command(name="eval", help=config.EvalConfig.__doc__)
@options_from(config.EvalConfig)
def eval_(**kw):
    from stages.evaluate import run

    result = run(config.build(config.EvalConfig, {**kw, "model": list(kw["model"])}, "kd eval"))
    click.echo(result["report"])
    click.echo(result["table"])


@cli.command(help=config.TrainConfig.__doc__)
@options_from(config.TrainConfig)
def train(**kw):
    from stages.train import run

    result = run(config.build(config.TrainConfig, kw, "kd train"))
    if result is not None:  # rank 0 only under torchrun
        click.echo(json.dumps(result))


@cli.command(help=config.TuneConfig.__doc__)
@options_from(config.TuneConfig)
def tune(**kw):
    from stages.tune import run

    click.echo(json.dumps(run(config.build(config.TuneConfig, kw, "kd tune"))))


@cli.command("run")
@click.argument("pipeline_file", type=click.Path(dir_okay=False))
@click.option("--out", "--workdir", "workdir", default=None,
              help="Where every output goes (default: the YAML's workdir, else runs/<file name>); --workdir: the same.")
@click.option("--dry-run", is_flag=True, help="Check the YAML and print the steps without running them.")
def run_pipeline(pipeline_file, workdir, dry_run):
    """Run every stage named in PIPELINE_FILE in order, reusing outputs that are complete and match."""
    from stages.run import run

    result = run(pipeline_file, workdir=workdir, dry_run=dry_run)
    if result.get("report"):
        click.echo(Path(result["report"]).read_text())


@cli.command()
@click.option("--out", "--workdir", "out", default="runs/demo", show_default=True,
              help="Where every stage's output goes (--workdir: the same, its older name).")
@click.option("--quick", is_flag=True, help="A reduced run (few rows and steps): what CI runs.")
def demo(out, quick):
    """The embedded default: a MiniLM teacher fine-tuned on a labelled part of Rotten Tomatoes labels the
    rest; a distilled 3-layer student, a cross-entropy baseline and a kd tune grid, evaluated with CIs."""
    from stages.run import demo as run_demo

    result = run_demo(out, quick=quick)
    report = Path(result["report"])
    click.echo(report.read_text())
    click.echo(f"report: {report}\nplot:   {report.parent / 'plot.png'}\n"
               f"({len(result['ran'])} steps ran, {len(result['reused'])} reused, {result['seconds']} s)")


# --- kd slurm -------------------------------------------------------------------------------

def _scheduler_options(f):
    for opt in reversed([
        click.option("--num-tasks", type=int, default=None, help="Number of array tasks (N)."),
        click.option("--array-parallel", "-M", type=int, default=None, help="At most M tasks at once (--array=…%M)."),
        click.option("--gpus", default=None, help="GPUs per task: N or TYPE:N (--gres=gpu:…)."),
        click.option("--cpus-per-task", type=int, default=None, help="CPUs per task (also OMP_NUM_THREADS)."),
        click.option("--mem", default=None, help="Memory per task, e.g. 32G."),
        click.option("--time", default=None, help="Time limit per task, e.g. 4:00:00."),
        click.option("--partition", default=None),
        click.option("--account", default=None),
        click.option("--job-name", default=None, help="Default: kd-STAGE-<out name>."),
        click.option("--logs", default=None, help="Directory of the per-task logs (default: ./slurm-logs)."),
        click.option("--kd", default=None, help="kd executable the jobs call (default: this one's absolute path)."),
        click.option("--extra-sbatch", multiple=True, help="More sbatch flags, e.g. '--qos=high' (repeatable)."),
        click.option("--submit", is_flag=True, help="Submit with sbatch and print the job ids instead of the script."),
    ]):
        f = opt(f)
    return click.argument("stage_args", nargs=-1, type=click.UNPROCESSED)(f)


PASSTHROUGH = {"ignore_unknown_options": True, "allow_extra_args": True}


def _split(kw: dict) -> tuple[bool, list[str], int | None, "slurm.Scheduler"]:
    return kw.pop("submit"), list(kw.pop("stage_args")), kw.pop("num_tasks"), slurm.Scheduler(**kw)


def _stage_params(stage: str, stage_args: list[str]) -> dict:
    """The stage's own parser (defaults, --config, validation) applied to the passthrough."""
    with cli.commands[stage].make_context(f"kd {stage}", list(stage_args)) as ctx:
        if ctx.params.get("task_index") is not None:
            raise KDError("drop --task-index from the stage arguments: every array task gets its own")
        return dict(ctx.params)


@cli.group("slurm")
def slurm_group():
    """Run a stage as a SLURM job array plus a dependent job (print the script, or --submit)."""


@slurm_group.command("teacher", context_settings=PASSTHROUGH)
@_scheduler_options
def teacher_cmd(**kw):
    """Stage 1 as an N-task array, then `kd finalize`. Pass kd teacher's flags after `--`.

    \b
    kd slurm teacher --num-tasks 8 -M 4 --gpus 1 --time 2:00:00 --submit -- \\
        --model TEACHER --data train.jsonl --task-type sequence-classification --out caches/train

    Rerun the same command after a failure: only tasks without a completion record go out.
    """
    submit, args, n, s = _split(kw)
    slurm.emit(slurm.teacher_work(args, _stage_params("teacher", args), n), s, submit)


@slurm_group.command("train", context_settings=PASSTHROUGH)
@_scheduler_options
def train_cmd(**kw):
    """A sweep of students as an array (task i trains entry i of --sweep FILE), then a summary.

    \b
    kd slurm train -M 8 --gpus 1 --submit -- \\
        --targets caches/train --sweep sweep.yaml --out students --max-steps 2000

    N is the number of sweep entries. The dependent job (afterany) runs `kd slurm summary`
    over every student directory: it lists them and fails unless all are complete. Rerun the
    same command after a failure: only entries without a manifest go out (they resume from
    their checkpoints).
    """
    submit, args, n, s = _split(kw)
    slurm.emit(slurm.train_work(args, _stage_params("train", args), n), s, submit)


@slurm_group.command("tune", context_settings=PASSTHROUGH)
@_scheduler_options
def tune_cmd(**kw):
    """A tune grid as an array (task i trains and scores point i), then `kd tune` for the outputs.

    \b
    kd slurm tune -M 8 --gpus 1 --time 2:00:00 --submit -- --targets caches/train \\
        --eval-targets caches/validation --temperatures 1,2,4 --alphas 0.5,0.9,1.0 \\
        --student-from-teacher teacher --student-layers 0,2,4 --max-steps 2000 --out tune

    N is the number of grid points. The dependent job (afterok) runs the same `kd tune` without
    an index: every point is then complete, so it only ranks them and writes tune.parquet,
    heatmap.png, report.md and the manifest. Rerun the same command after a failure: only points
    without a finished student and evaluation go out (they resume from their checkpoints).
    """
    submit, args, n, s = _split(kw)
    slurm.emit(slurm.tune_work(args, _stage_params("tune", args), n), s, submit)


@slurm_group.command("summary")
@click.argument("directories", nargs=-1, required=True, type=click.Path(file_okay=False))
def summary_cmd(directories):
    """One line per output directory (complete or not); exit status 1 unless all are complete."""
    from pipeline import manifest

    incomplete = []
    for d in directories:
        path = Path(d)
        if not (path / manifest.MANIFEST).exists():
            incomplete.append(d)
            click.echo(f"{d}: " + ("incomplete" if (path / manifest.PLAN).exists() else "not started"))
            continue
        try:
            m = manifest.read_manifest(path)
        except KDError as exc:
            incomplete.append(d)
            click.echo(f"{d}: damaged ({exc})")
            continue
        final = (m.get("stats") or {}).get("final") or {}
        shown = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in final.items())
        upstream = ", ".join(u.get("key", "?")[:12] for u in m.get("upstream", []))
        click.echo(f"{d}: complete {m.get('kind')} {m.get('key', '?')[:12]}"
                   + (f" from {upstream}" if upstream else "") + (f"; {shown}" if shown else ""))
    if incomplete:
        raise KDError(f"{len(incomplete)} of {len(directories)} output(s) incomplete; rerun the same "
                      f"`kd slurm` command to resubmit only those")


def main():
    cli(prog_name="kd")


if __name__ == "__main__":
    main()
