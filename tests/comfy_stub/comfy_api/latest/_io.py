"""Stand-in for ``comfy_api.latest._io`` (ComfyUI 0.8.0): the socket classes, ``Schema``, ``ComfyNode``,
``NodeOutput`` and ``Custom``, with the same constructor signatures. Inputs and outputs keep every keyword they
were given (as attributes, and all of them in ``kwargs``) so tests can check tooltips, ranges and defaults.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class FolderType(str, Enum):
    input = "input"
    output = "output"
    temp = "temp"


class UploadType(str, Enum):
    image = "image_upload"
    audio = "audio_upload"
    video = "video_upload"
    model = "file_upload"


class Hidden(str, Enum):
    unique_id = "UNIQUE_ID"
    prompt = "PROMPT"
    extra_pnginfo = "EXTRA_PNGINFO"
    dynprompt = "DYNPROMPT"


class _ComfyType:
    Type = Any
    io_type: str = None


class _IO_V3:
    Parent: type[_ComfyType] = None

    @property
    def io_type(self) -> str:
        return self.Parent.io_type


class Input(_IO_V3):
    def __init__(
        self,
        id: str,
        display_name: str = None,
        optional=False,
        tooltip: str = None,
        lazy: bool = None,
        extra_dict=None,
        raw_link: bool = None,
    ):
        self.id = id
        self.display_name = display_name
        self.optional = optional
        self.tooltip = tooltip
        self.lazy = lazy
        self.extra_dict = extra_dict if extra_dict is not None else {}
        self.raw_link = raw_link


class WidgetInput(Input):
    def __init__(
        self,
        id: str,
        display_name: str = None,
        optional=False,
        tooltip: str = None,
        lazy: bool = None,
        default: Any = None,
        socketless: bool = None,
        widget_type: str = None,
        force_input: bool = None,
        extra_dict=None,
        raw_link: bool = None,
    ):
        super().__init__(id, display_name, optional, tooltip, lazy, extra_dict, raw_link)
        self.default = default
        self.socketless = socketless
        self.widget_type = widget_type
        self.force_input = force_input


class Output(_IO_V3):
    def __init__(self, id: str = None, display_name: str = None, tooltip: str = None, is_output_list=False):
        self.id = id
        self.display_name = display_name if display_name else id
        self.tooltip = tooltip
        self.is_output_list = is_output_list


def _copy_class(cls: type) -> type:
    return type(cls.__name__, (cls,), {})


def comfytype(io_type: str):
    """Bind ``io_type`` to a socket class and point its ``Input``/``Output`` at it (like the real decorator)."""

    def decorator(cls):
        if hasattr(cls, "Input"):
            cls.Input = _copy_class(cls.Input)
            cls.Input.Parent = cls
        if hasattr(cls, "Output"):
            cls.Output = _copy_class(cls.Output)
            cls.Output.Parent = cls
        cls.io_type = io_type
        return cls

    return decorator


class ComfyTypeI(_ComfyType):
    class Input(Input): ...


class ComfyTypeIO(ComfyTypeI):
    class Output(Output): ...


def Custom(io_type: str) -> type[ComfyTypeIO]:
    @comfytype(io_type=io_type)
    class CustomComfyType(ComfyTypeIO): ...

    return CustomComfyType


@comfytype(io_type="BOOLEAN")
class Boolean(ComfyTypeIO):
    Type = bool

    class Input(WidgetInput):
        def __init__(
            self,
            id: str,
            display_name: str = None,
            optional=False,
            tooltip: str = None,
            lazy: bool = None,
            default: bool = None,
            label_on: str = None,
            label_off: str = None,
            socketless: bool = None,
            force_input: bool = None,
            extra_dict=None,
            raw_link: bool = None,
        ):
            super().__init__(
                id, display_name, optional, tooltip, lazy, default, socketless, None, force_input, extra_dict, raw_link
            )
            self.label_on = label_on
            self.label_off = label_off


@comfytype(io_type="INT")
class Int(ComfyTypeIO):
    Type = int

    class Input(WidgetInput):
        def __init__(
            self,
            id: str,
            display_name: str = None,
            optional=False,
            tooltip: str = None,
            lazy: bool = None,
            default: int = None,
            min: int = None,
            max: int = None,
            step: int = None,
            control_after_generate: bool = None,
            display_mode=None,
            socketless: bool = None,
            force_input: bool = None,
            extra_dict=None,
            raw_link: bool = None,
        ):
            super().__init__(
                id, display_name, optional, tooltip, lazy, default, socketless, None, force_input, extra_dict, raw_link
            )
            self.min = min
            self.max = max
            self.step = step
            self.control_after_generate = control_after_generate
            self.display_mode = display_mode


@comfytype(io_type="FLOAT")
class Float(ComfyTypeIO):
    Type = float

    class Input(WidgetInput):
        def __init__(
            self,
            id: str,
            display_name: str = None,
            optional=False,
            tooltip: str = None,
            lazy: bool = None,
            default: float = None,
            min: float = None,
            max: float = None,
            step: float = None,
            round: float = None,
            display_mode=None,
            socketless: bool = None,
            force_input: bool = None,
            extra_dict=None,
            raw_link: bool = None,
        ):
            super().__init__(
                id, display_name, optional, tooltip, lazy, default, socketless, None, force_input, extra_dict, raw_link
            )
            self.min = min
            self.max = max
            self.step = step
            self.round = round
            self.display_mode = display_mode


@comfytype(io_type="STRING")
class String(ComfyTypeIO):
    Type = str

    class Input(WidgetInput):
        def __init__(
            self,
            id: str,
            display_name: str = None,
            optional=False,
            tooltip: str = None,
            lazy: bool = None,
            multiline=False,
            placeholder: str = None,
            default: str = None,
            dynamic_prompts: bool = None,
            socketless: bool = None,
            force_input: bool = None,
            extra_dict=None,
            raw_link: bool = None,
        ):
            super().__init__(
                id, display_name, optional, tooltip, lazy, default, socketless, None, force_input, extra_dict, raw_link
            )
            self.multiline = multiline
            self.placeholder = placeholder
            self.dynamic_prompts = dynamic_prompts


@comfytype(io_type="COMBO")
class Combo(ComfyTypeIO):
    Type = str

    class Input(WidgetInput):
        def __init__(
            self,
            id: str,
            options: list[str] | list[int] | type[Enum] = None,
            display_name: str = None,
            optional=False,
            tooltip: str = None,
            lazy: bool = None,
            default: str | int | Enum = None,
            control_after_generate: bool = None,
            upload: UploadType = None,
            image_folder: FolderType = None,
            remote=None,
            socketless: bool = None,
            extra_dict=None,
            raw_link: bool = None,
        ):
            if isinstance(options, type) and issubclass(options, Enum):
                options = [v.value for v in options]
            if isinstance(default, Enum):
                default = default.value
            super().__init__(
                id, display_name, optional, tooltip, lazy, default, socketless, None, None, extra_dict, raw_link
            )
            self.options = options
            self.control_after_generate = control_after_generate
            self.upload = upload
            self.image_folder = image_folder
            self.remote = remote


def _plain(io_type: str, type_: Any = Any):
    @comfytype(io_type=io_type)
    class PlainType(ComfyTypeIO):
        Type = type_

    return PlainType


Image = _plain("IMAGE")
Mask = _plain("MASK")
Latent = _plain("LATENT")
Conditioning = _plain("CONDITIONING")
Sampler = _plain("SAMPLER")
Sigmas = _plain("SIGMAS")
Noise = _plain("NOISE")
Guider = _plain("GUIDER")
Clip = _plain("CLIP")
ControlNet = _plain("CONTROL_NET")
Vae = _plain("VAE")
Model = _plain("MODEL")


@dataclass
class Schema:
    node_id: str
    display_name: str = None
    category: str = "sd"
    inputs: list[Input] = field(default_factory=list)
    outputs: list[Output] = field(default_factory=list)
    hidden: list[Hidden] = field(default_factory=list)
    description: str = ""
    is_input_list: bool = False
    is_output_node: bool = False
    is_deprecated: bool = False
    is_experimental: bool = False
    is_api_node: bool = False
    not_idempotent: bool = False
    enable_expand: bool = False

    def validate(self) -> None:
        """Ids unique among inputs and among outputs (as ComfyUI checks when it registers the node)."""
        issues = []
        for what, ids in (("Input", [i.id for i in self.inputs]), ("Output", [o.id for o in self.outputs])):
            dupes = [k for k, n in Counter(ids).items() if n > 1]
            if dupes:
                issues.append(f"{what} ids must be unique, but {dupes} are not.")
        if issues:
            raise ValueError("\n".join(issues))

    def finalize(self) -> None:
        if self.is_output_node:
            for h in (Hidden.prompt, Hidden.extra_pnginfo):
                if h not in self.hidden:
                    self.hidden.append(h)
        for i, output in enumerate(self.outputs):
            if output.id is None:
                output.id = f"_{i}_{output.io_type}_"


class ComfyNode:
    """Base class of V3 nodes: classmethods only, no instance state."""

    hidden = None

    @classmethod
    @abstractmethod
    def define_schema(cls) -> Schema:
        raise NotImplementedError

    @classmethod
    @abstractmethod
    def execute(cls, **kwargs) -> NodeOutput:
        raise NotImplementedError

    @classmethod
    def validate_inputs(cls, **kwargs) -> bool | str:
        raise NotImplementedError

    @classmethod
    def fingerprint_inputs(cls, **kwargs) -> Any:
        raise NotImplementedError

    @classmethod
    def GET_SCHEMA(cls) -> Schema:
        schema = cls.define_schema()
        schema.validate()
        schema.finalize()
        return schema


class NodeOutput:
    def __init__(self, *args: Any, ui=None, expand: dict = None, block_execution: str = None):
        self.args = args
        self.ui = ui
        self.expand = expand
        self.block_execution = block_execution

    @property
    def result(self):
        return self.args if len(self.args) > 0 else None

    def __getitem__(self, index) -> Any:
        return self.args[index]


class _UIOutput(ABC):
    @abstractmethod
    def as_dict(self) -> dict: ...
