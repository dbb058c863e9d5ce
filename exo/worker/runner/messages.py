"""What a node and its runner processes say to each other over the runner's stdin and stdout.

Frames are a 4-byte big-endian length and a codec frame. A runner's failure crosses the pipe as
a status or a task record with its reason, never as a traceback.
"""

from __future__ import annotations

import struct
from typing import BinaryIO

from exo.engine.generate import FinishReason
from exo.net.codec import Codec
from exo.shared.generation import GenerationParams
from exo.shared.runners import RunnerStatus, TaskKind, TaskStatus
from exo.shared.types import CacheDtype, Dtype, FrozenModel, InstanceId

_LENGTH = struct.Struct(">I")
HEADER_SIZE = _LENGTH.size


class RunnerSpec(FrozenModel):
    """Everything a runner process needs to start: given once, on its command line."""

    node_id: str
    instance_id: InstanceId
    rank: int
    world_size: int
    model_path: str
    start: int
    end: int
    n_layers: int
    dtype: Dtype
    kv_cache: CacheDtype | None = None
    context: int | None = None  # positions its instance serves (picks longrope's factors); None: the model's


# -- node to runner ------------------------------------------------------------------------------

class Task(FrozenModel):
    task_id: str
    kind: TaskKind
    hosts: tuple[str, ...] = ()        # Connect: "host:port" of every rank, in rank order
    prompt: tuple[int, ...] = ()       # Chat
    params: GenerationParams | None = None


class Cancel(FrozenModel):
    task_id: str


# -- runner to node ------------------------------------------------------------------------------

class StatusChanged(FrozenModel):
    status: RunnerStatus
    error: str | None = None


class TaskChanged(FrozenModel):
    task_id: str
    kind: TaskKind
    status: TaskStatus
    error: str | None = None


class BatchChanged(FrozenModel):
    """How many chats the runner's batch decodes together now (an instance of one rank batches its chats)."""

    size: int


class Generated(FrozenModel):
    task_id: str
    text: str
    n_tokens: int
    finish_reason: FinishReason | None = None
    cached_tokens: int = 0  # with the finish reason: prompt tokens whose key/values the prefix cache held
    stop_sequence: str | None = None  # with the finish reason: the stop string that ended the text, if one did


PIPE_CODEC = Codec(Task, Cancel, StatusChanged, TaskChanged, Generated, BatchChanged)


def pack_frame(message: FrozenModel) -> bytes:
    data = PIPE_CODEC.encode(message)
    return _LENGTH.pack(len(data)) + data


def frame_size(header: bytes) -> int:
    """The length of the frame that follows a `HEADER_SIZE`-byte header."""
    return int(_LENGTH.unpack(header)[0])


def write_frame(stream: BinaryIO, message: FrozenModel) -> None:
    stream.write(pack_frame(message))
    stream.flush()


def read_frame(stream: BinaryIO) -> FrozenModel | None:
    """The next message, or None at the end of the stream."""
    header = stream.read(HEADER_SIZE)
    return None if len(header) < HEADER_SIZE else PIPE_CODEC.decode(stream.read(frame_size(header)))
