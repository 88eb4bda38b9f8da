"""What the workers' own folders hold, LoRA files and weights, merged into one answer of `wanrt serve`'s shape.

A load (and its `loras`) runs on whichever worker a front picks, and again on each worker an offer needs, so what
matters is what each worker has. The answers keep every field of the single server's and add, per LoRA file or per
pipeline, which workers have it; a worker that did not answer is named with why, never dropped silently.

LoRAs are listed as the union of the folders, each file with `workers` (where it is) and `missing_on` (the workers
that answered without it), rather than only the files on every worker: a file missing on one worker of many is a
copy to make there, and hiding it would make the listing disagree with that worker's folder without saying why. A
load naming LoRAs is placed on a worker whose folder has them all (each worker's summary lists its folder; a load
that no live worker can take is refused (422) naming what each lacks), and its offers go only to such workers.
"""

from __future__ import annotations

import msgspec

from serve.hub import Progress
from serve.schemas import LoraFileInfo, LoraList, ModelFileState, ModelsDownloadProgress, ModelsStatus, WorkerModels


def merge_loras(answers: list[tuple[str, LoraList]], skipped: dict[str, str]) -> LoraList:
    """Every path in any worker's LoRA folder, described as the first worker (by name) that has it lists it."""
    first: dict[str, LoraFileInfo] = {}
    holders: dict[str, list[str]] = {}
    for name, listing in answers:
        for file in listing.lora_files:
            first.setdefault(file.path, file)
            holders.setdefault(file.path, []).append(name)
    answered = [name for name, _ in answers]
    files = [
        msgspec.structs.replace(
            file, workers=holders[path], missing_on=[name for name in answered if name not in holders[path]]
        )
        for path, file in sorted(first.items())
    ]
    return LoraList(lora_files=files, skipped_workers=skipped)


def merge_models(pipeline_id: str, answers: list[tuple[str, ModelsStatus]], skipped: dict[str, str]) -> ModelsStatus:
    """`downloaded` when every worker that answered has every file; `files` present / verified where they are on
    all of those; `progress` the sum of their downloads (downloading while any is, then an error if any failed)."""
    workers = [WorkerModels(name, status.downloaded, status.files, status.progress) for name, status in answers]
    workers += [WorkerModels(name, error=why) for name, why in skipped.items()]
    return ModelsStatus(
        pipeline_id=pipeline_id,
        downloaded=bool(answers) and all(status.downloaded for _, status in answers),
        files=_merge_files(answers),
        progress=_merge_progress([(name, status.progress) for name, status in answers]),
        workers=sorted(workers, key=lambda worker: worker.name),
    )


def _merge_files(answers: list[tuple[str, ModelsStatus]]) -> list[ModelFileState]:
    """One entry per file of the first answer; `local_path` names each worker's path (`worker:path, ...`)."""
    if not answers:
        return []
    by_key = [{(f.repo, f.path): f for f in status.files} for _, status in answers]
    merged = []
    for template in answers[0][1].files:
        states = [files.get((template.repo, template.path)) for files in by_key]  # None: a worker of another version
        sizes = {state.size_bytes for state in states if state is not None}
        merged.append(
            ModelFileState(
                repo=template.repo,
                path=template.path,
                local_path=", ".join(
                    f"{name}:{s.local_path}" for (name, _), s in zip(answers, states, strict=True) if s
                ),
                present=all(state is not None and state.present for state in states),
                size_bytes=sizes.pop() if len(sizes) == 1 else None,
                verified=all(state is not None and state.verified for state in states),
            )
        )
    return merged


def _merge_progress(progresses: list[tuple[str, ModelsDownloadProgress]]) -> ModelsDownloadProgress:
    states = {progress.state for _, progress in progresses}
    if "downloading" in states:
        state = "downloading"
    elif "error" in states:
        state = "error"
    else:
        state = "done" if states == {"done"} else "idle"
    downloading = [progress for _, progress in progresses if progress.state == "downloading"]
    errors = [f"{name}: {progress.error}" for name, progress in progresses if progress.state == "error"]
    return Progress(
        state=state,
        bytes_done=sum(progress.bytes_done for _, progress in progresses),
        bytes_total=sum(progress.bytes_total for _, progress in progresses),
        current_file=downloading[0].current_artifact if downloading else None,
        error="; ".join(errors) or None,
    ).snapshot()
