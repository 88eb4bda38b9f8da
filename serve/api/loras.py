"""User LoRAs: the files in the LoRA folder (Scope's GET /loras), which a load's `loras` names."""

from __future__ import annotations

from litestar import Controller, get
from litestar.datastructures import State

from serve.schemas import LoraList


class LoraController(Controller):
    path = "/api/v1/loras"
    tags = ["loras"]

    @get("/")
    async def list_loras(self, state: State) -> LoraList:
        """Every `.safetensors` / `.pt` / `.bin` file under the LoRA folder (`--lora-dir`), with its rank and the
        base model its shapes fit; `sha256` is null until the background hash of that file version is done. A
        cluster front lists every live worker's folder: `workers` and `missing_on` say which have each file."""
        return await state.serving.list_loras()
