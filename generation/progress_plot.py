"""``suti generate --status OUTPUT --progress-plot PNG``: the job's progress as a picture.

Two panels over wall time (UTC), from the manifest rows that ``--status`` reads (their
``finished_at``, :func:`generation.status.row_times`):

* top: samples kept so far (cumulative, the accepted clusters' kept samples at their finish);
* bottom: experts per hour, as finishes per time bin (bars, the bin chosen so that the job's
  span makes at most :data:`MAX_BINS` of them) and as ``--status`` reports it after each finish
  (line: :class:`generation.status.Throughput`, the last hour of work).

Drawn with matplotlib's Agg canvas (no display, no global backend switched), and written
atomically to a local path or any fsspec URI (:func:`suti.storage.write_bytes`): a watcher may
redraw the same file while a job runs.
"""

from __future__ import annotations

import datetime
import io
import os

from generation.status import HOUR, JobStatus, Throughput
from suti import storage
from suti.errors import InputError, MissingInputError, OutputExistsError, describe_os_error

FLAG = "--progress-plot"
#: At most this many bars in the experts/hour panel.
MAX_BINS = 60
#: Bin widths (seconds) to choose from: the smallest that gives at most MAX_BINS bars.
BIN_SECONDS = (60, 300, 600, 900, 1800, 3600, 2 * 3600, 6 * 3600, 12 * 3600, 24 * 3600, 7 * 24 * 3600)


def check_plot_path(path: str) -> str:
    """The resolved ``--progress-plot`` path or URI once a PNG can be written there.

    Raises:
        InputError: not a ``.png`` name, a folder, a missing parent folder (local), a parent that
            is a file or not writable, a missing bucket or filesystem package (URI).
    """
    uri = storage.resolve(path)
    if not uri.lower().endswith(".png"):
        raise InputError(f"{FLAG} {path}: the plot is a PNG image; give a name ending in .png")
    local = storage.local_path(uri)
    if local is None:
        storage.filesystem(uri)  # a missing s3fs/gcsfs: one line naming the extra
        storage.require_bucket(uri)
        return uri
    if local.is_dir():
        raise OutputExistsError(f"{FLAG} {path}: is a folder; give a .png file name")
    folder = local.parent
    if not folder.is_dir():
        blocker = next((p for p in folder.parents if p.exists() and not p.is_dir()), folder if folder.exists() else None)
        if blocker is not None:
            raise OutputExistsError(f"{FLAG} {path}: {blocker} is a file, not a folder")
        raise MissingInputError(f"{FLAG} {path}: no folder {folder} (create it first)")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise InputError(f"{FLAG} {path}: {folder} is not writable (a read-only file system or no permission)")
    return str(local)


def bin_seconds(span: float) -> int:
    """The bin width (seconds) for a job that spans ``span`` seconds (:data:`BIN_SECONDS`)."""
    return next((w for w in BIN_SECONDS if span / w <= MAX_BINS), BIN_SECONDS[-1])


def draw_progress(status: JobStatus, rows: dict[str, dict], times: dict[str, tuple[float, float]]) -> bytes:
    """The progress plot as PNG bytes (see the module's docstring); a job with no timed row
    gives a plot that says so."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 6), dpi=100)
    FigureCanvasAgg(fig)
    top, bottom = fig.subplots(2, 1, sharex=True)
    of = f" of {status.total}" if status.total is not None else ""
    fig.suptitle(f"{status.output}\n{status.finished}{of} clusters finished, {status.samples_kept} samples kept", fontsize=10)
    top.set_ylabel("samples kept")
    bottom.set_ylabel("experts / hour")
    bottom.set_xlabel("time (UTC)")
    order = sorted(times, key=lambda cid: times[cid][1])
    if not order:
        top.text(0.5, 0.5, "no timed expert yet", ha="center", va="center", transform=top.transAxes)
    else:
        _draw_samples(top, order, rows, times)
        _draw_rates(bottom, order, times)
        bottom.legend(loc="upper left", fontsize=8)
        fig.autofmt_xdate()
    for ax in (top, bottom):
        ax.grid(alpha=0.3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _when(unix: float) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(unix, tz=datetime.timezone.utc)


def _draw_samples(ax, order: list[str], rows: dict[str, dict], times: dict[str, tuple[float, float]]) -> None:
    x, y, kept = [_when(times[order[0]][0])], [0], 0
    for cid in order:
        row = rows[cid]
        kept += len(row.get("kept") or []) if row.get("status") == "accepted" else 0
        x.append(_when(times[cid][1]))
        y.append(kept)
    ax.step(x, y, where="post", color="tab:green")


def _draw_rates(ax, order: list[str], times: dict[str, tuple[float, float]]) -> None:
    start = min(s for s, _ in times.values())
    finishes = [times[cid][1] for cid in order]
    width = bin_seconds(max(finishes[-1] - start, 1.0))
    counts: dict[int, int] = {}
    for f in finishes:
        counts[int((f - start) // width)] = counts.get(int((f - start) // width), 0) + 1
    lefts = [_when(start + i * width) for i in sorted(counts)]
    ax.bar(lefts, [counts[i] * HOUR / width for i in sorted(counts)], width=datetime.timedelta(seconds=width), align="edge",
           color="tab:blue", alpha=0.4, label=f"finished in each {_width_name(width)} bin, as a rate per hour")
    throughput, line_x, line_y = Throughput(), [], []
    for cid in order:
        throughput.add(*times[cid])
        rate = throughput.rate(times[cid][1])
        if rate is not None:
            line_x.append(_when(times[cid][1]))
            line_y.append(rate)
    ax.plot(line_x, line_y, color="tab:orange", label="last hour of work (as --status)")


def _width_name(seconds: int) -> str:
    return f"{seconds // 60} min" if seconds < HOUR else f"{seconds // 3600} h"


def write_progress_plot(path: str, status: JobStatus, rows: dict[str, dict], times: dict[str, tuple[float, float]]) -> None:
    """Draw the plot and write it to ``path`` (checked by :func:`check_plot_path`) atomically.

    Raises:
        InputError: the write failed (a full disk, a permission, a storage error), in one line.
    """
    data = draw_progress(status, rows, times)
    try:
        storage.write_bytes(path, data)
    except OSError as exc:
        raise InputError(f"{FLAG} {path}: cannot be written ({describe_os_error(exc)})") from None

