"""Any ``nn.Module`` seen through one contract: its embedding, its logits, its classifier, the
input statistics it expects.

:class:`Network` wraps the user's module (from refilled's zoo, torchvision, timm or the user's
own code) without changing it:

* **embedding** (``embedding=``):
  - ``None`` (default): the zoo's ``forward_features`` / ``forward_head`` when the module has
    that contract; otherwise the *input of the module's last* ``nn.Linear`` (the penultimate
    features of torchvision and timm classifiers and of plain ``nn.Sequential`` s), captured
    with a forward pre-hook;
  - the name of a submodule (``"layer4"``, ``"features.7"``): that submodule's output,
    globally average-pooled when it is a 4-D map (tokens ``(B, N, D)`` are averaged over N);
  - ``"forward_features"``: the module's own ``forward_features(x)``, pooled the same way;
  - ``"output"``: the module's output is the embedding (a feature extractor without logits).
* **classifier** (``head=``): the zoo's ``head``, else the last ``nn.Linear``, or a named
  submodule; :meth:`Network.reset_classifier` swaps in a fresh ``nn.Linear`` of the right size.
* **input statistics** (``mean=``, ``std=``): inputs arrive in [0, 1] (or as the user's float
  tensors) and each network normalises them itself, so a teacher trained with ImageNet
  statistics and a student with its dataset's statistics each get what they expect.
* **feature maps** (``maps=``, for AT / FitNet / SP): the zoo's ``forward_maps``, or the outputs
  of the named submodules.

A zoo model goes through exactly the same operations as before it was wrapped (its own
``forward_features`` then ``forward_head``), so results do not move.
"""

from __future__ import annotations

import copy
import numbers
from typing import Sequence

import torch
import torch.nn as nn

from refilled.config import spell
from refilled.errors import ConfigError

ZOO_CONTRACT = ("forward_features", "forward_head", "num_features", "reset_classifier")


def pool(t: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C) by the spatial mean; (B, N, D) -> (B, D) by the token mean."""
    if t.dim() == 4:
        return t.mean(dim=(2, 3))
    if t.dim() == 3:
        return t.mean(dim=1)
    if t.dim() == 2:
        return t
    return t.flatten(1)


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    if isinstance(out, dict):
        for value in out.values():
            if isinstance(value, torch.Tensor):
                return value
    raise TypeError(f"expected a tensor output, got {type(out).__name__}")


def has_zoo_contract(module: nn.Module) -> bool:
    return all(hasattr(module, name) for name in ZOO_CONTRACT)


def last_linear(module: nn.Module) -> tuple[str, nn.Linear] | None:
    """(name, module) of the last ``nn.Linear`` in registration order, or None."""
    found = None
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            found = (name, sub)
    return found


def _key(role: str, what: str) -> str:
    """A network's setting as the caller spells it (``student.head`` / ``head=``)."""
    return spell(f"{role}.{what}") if role in ("student", "teacher") else what


def _submodule(module: nn.Module, path: str, role: str, what: str) -> nn.Module:
    try:
        return module.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in module.named_children()]
        raise ConfigError(
            f"{_key(role, what)}: the {role} has no submodule '{path}' (its top-level submodules: "
            f"{', '.join(names) or 'none'}); name one of them, or a dotted path inside one"
        ) from None


class Network(nn.Module):
    """A user's module with refilled's contract (see the module docstring).

    ``role`` ("teacher" / "student") only names the config section in error messages.
    State dicts keep the wrapped module's own keys under ``module.``; :meth:`module_state_dict`
    gives the module's plain ``state_dict()``.
    """

    def __init__(self, module: nn.Module, *, embedding: str | None = None, head: str | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 maps: Sequence[str] | None = None, role: str = "model"):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise ConfigError(f"the {role} must be a torch.nn.Module, got {type(module).__name__}")
        self.module = module
        self.role = role
        self.embedding_spec = embedding
        self.zoo = embedding is None and head is None and not maps and has_zoo_contract(module)
        self._captured: dict[str, torch.Tensor] = {}
        self._handles = []
        mean_t, std_t = _stats(mean, std, role)
        self.register_buffer("mean", mean_t, persistent=False)
        self.register_buffer("std", std_t, persistent=False)
        self._num_features: int | None = None
        self._num_classes: int | None = None
        # How evaluation feeds it (CUDA): NHWC batches; every batch padded to one size once its
        # passes are compiled, so the last, smaller batch never triggers a recompile.
        self.channels_last = False
        self.fixed_batch = False
        self._compiled = None  # torch.compile of _pass (compile_passes); never copied
        self.head_name = None
        self.head_given = False  # True: named by the user (head=); False: guessed
        self._head_in: int | None = None  # the width of the classifier's input (probed)
        self._probed: tuple | None = None  # the input shape of the last probe
        if self.zoo:
            self.head_name = "head" if isinstance(getattr(module, "head", None), nn.Module) else None
        elif head is not None:
            _submodule(module, head, role, "head")
            self.head_name = head
            self.head_given = True
        else:
            found = last_linear(module)
            self.head_name = found[0] if found is not None else None
        if not self.zoo:
            self._install_hooks(embedding, maps)
        self.map_names = tuple(maps or ())

    # ------------------------------------------------------------------ hooks

    def _install_hooks(self, embedding, maps) -> None:
        role = self.role
        if embedding is None:
            if self.head_name is None:
                raise ConfigError(
                    f"cannot find the {role}'s embedding: it has no nn.Linear classifier whose "
                    f"input would be the embedding; set {_key(role, 'embedding')} to the name of the "
                    "submodule whose output is the embedding (or 'output' for a feature extractor)"
                )
            self._pre_hook(self.module.get_submodule(self.head_name), "embedding")
        elif embedding not in ("forward_features", "output"):
            self._post_hook(_submodule(self.module, embedding, role, "embedding"), "embedding")
        elif embedding == "forward_features" and not callable(getattr(self.module, "forward_features", None)):
            raise ConfigError(f"{_key(role, 'embedding')} is 'forward_features' but the {role} has no "
                              "forward_features method; name a submodule instead")
        for i, name in enumerate(maps or ()):
            self._post_hook(_submodule(self.module, name, role, "maps"), f"map{i}")

    def _pre_hook(self, sub: nn.Module, key: str) -> None:
        def hook(_module, args):
            self._captured[key] = args[0]

        self._handles.append(sub.register_forward_pre_hook(hook))

    def _post_hook(self, sub: nn.Module, key: str) -> None:
        def hook(_module, _args, out):
            self._captured[key] = _first_tensor(out)

        self._handles.append(sub.register_forward_hook(hook))

    # ------------------------------------------------------------------ passes

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is None:
            return x
        return (x - self.mean) / self.std

    def _run(self, x: torch.Tensor):
        """The module on a normalised batch: (output, captured tensors)."""
        self._captured = {}
        out = self.module(x)
        captured, self._captured = self._captured, {}
        return out, captured

    def _generic(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        """(embedding, logits or None, captured tensors) of a normalised batch."""
        spec = self.embedding_spec
        if spec == "forward_features":
            feats = self.module.forward_features(x)
            head = getattr(self.module, "forward_head", None)
            return pool(_first_tensor(feats)), (_first_tensor(head(feats)) if callable(head) else None), {}
        out, captured = self._run(x)
        out = _first_tensor(out)
        if spec == "output":
            return pool(out), None, captured
        if "embedding" not in captured:
            if spec is None:  # the embedding is the classifier's input: the classifier did not run
                raise ConfigError(
                    f"the {self.role}'s classifier was taken to be '{self.head_name}' "
                    f"({'given as ' + _key(self.role, 'head') if self.head_given else 'the last nn.Linear it registers'}), "
                    f"but it does not run in the {self.role}'s forward pass, so its input (the "
                    f"embedding) is never seen; name the classifier with {_key(self.role, 'head')} "
                    f"(and the embedding with {_key(self.role, 'embedding')})")
            raise ConfigError(f"the {self.role}'s embedding layer did not run in its forward pass; "
                              f"set {_key(self.role, 'embedding')} to a submodule that does")
        return pool(captured["embedding"]), out, captured

    def _pass(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(embedding, logits or None) of a normalised batch."""
        if self.zoo:
            z = self.module.forward_features(x)
            return z, self.module.forward_head(z)
        z, logits, _ = self._generic(x)
        return z, logits

    def features_and_logits(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(embedding (B, D), logits (B, K) or None) of raw inputs, in one pass."""
        x = self.normalize(x)
        return self._compiled(x) if self._compiled is not None else self._pass(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding (B, D) of raw inputs."""
        x = self.normalize(x)
        if self._compiled is not None:
            return self._compiled(x)[0]
        if self.zoo:
            return self.module.forward_features(x)
        return self._generic(x)[0]

    def forward_head(self, z: torch.Tensor) -> torch.Tensor:
        """Logits from an embedding: the classifier applied to it (its input is the embedding)."""
        if self.zoo:
            return self.module.forward_head(z)
        if self.head_name is None:
            raise ConfigError(f"the {self.role} has no classifier; set {_key(self.role, 'head')}")
        return self.classifier(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of raw inputs (the module's own forward on the normalised batch)."""
        x = self.normalize(x)
        if self._compiled is not None and self.has_logits:
            return self._compiled(x)[1]
        if self.zoo:
            return self.module(x)
        out, _ = self._run(x)
        return _first_tensor(out)

    @property
    def has_maps(self) -> bool:
        return bool(self.map_names) or (self.zoo and callable(getattr(self.module, "forward_maps", None)))

    def maps_and_logits(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Feature maps (B, C, H, W) in order and the logits, in one pass."""
        x = self.normalize(x)
        if self.zoo:
            maps = self.module.forward_maps(x)
            return maps, self.module.forward_head(maps[-1].mean(dim=(2, 3)))
        if not self.map_names:
            raise ConfigError(f"this method needs the {self.role}'s feature maps: set "
                              f"{_key(self.role, 'maps')} to the names of the submodules whose outputs "
                              "are the maps, in order")
        out, captured = self._run(x)
        return [captured[f"map{i}"] for i in range(len(self.map_names))], _first_tensor(out)

    def forward_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.maps_and_logits(x)[0]

    # ------------------------------------------------------------------ sizes and classifier

    @torch.no_grad()
    def probe(self, example: torch.Tensor) -> None:
        """Learn the embedding and logit sizes from a forward pass on ``example`` (eval mode;
        once per input shape), and check that the module taken as the classifier is the one that
        makes the logits: one line naming it, and ``head=`` / ``embedding=``, when it is not."""
        shape = tuple(example.shape[1:])
        if self._probed == shape:
            return
        head = None if self.zoo else self.classifier
        seen: dict = {}
        handles = []
        if head is not None:
            handles.append(head.register_forward_hook(
                lambda _m, args, out: seen.update(inp=args[0] if args else None, out=out)))
        was = self.training
        self.eval()
        try:
            z, logits = self.features_and_logits(example)
        finally:
            for h in handles:
                h.remove()
            self.train(was)
        if z.dim() != 2:
            raise ConfigError(f"the {self.role}'s embedding has shape {tuple(z.shape)}; it must be "
                              f"(batch, features): set {_key(self.role, 'embedding')} to a submodule "
                              "whose output is a feature vector or map")
        self._num_features = int(z.shape[1])
        self._num_classes = None if logits is None else int(logits.shape[1])
        if head is not None and self.has_logits:
            self._check_head(seen, logits)
        self._probed = shape

    def _check_head(self, seen: dict, logits: torch.Tensor) -> None:
        """The classifier ran, takes (B, D) features and gives the logits the model returns."""
        taken = (f"the module '{self.head_name}' given as {_key(self.role, 'head')}" if self.head_given
                 else f"'{self.head_name}' (the last nn.Linear it registers)")
        fix = (f"name the classifier with {_key(self.role, 'head')} (and the embedding with "
               f"{_key(self.role, 'embedding')})")
        if "out" not in seen:
            raise ConfigError(f"the {self.role}'s classifier was taken to be {taken}, but it does not "
                              f"run in the {self.role}'s forward pass; {fix}")
        inp, out = seen["inp"], seen["out"]
        if not isinstance(inp, torch.Tensor) or inp.dim() != 2:
            got = tuple(inp.shape) if isinstance(inp, torch.Tensor) else type(inp).__name__
            raise ConfigError(f"the {self.role}'s classifier was taken to be {taken}, but its input "
                              f"is {got}, not (batch, features): refilled replaces the classifier "
                              f"with an nn.Linear on a feature vector; {fix}")
        out = out if isinstance(out, torch.Tensor) else None
        same_shape = out is not None and out.shape == logits.shape
        if not same_shape or (not self.head_given and not (
                out is logits or torch.allclose(out.float(), logits.float(), rtol=1e-4, atol=1e-5))):
            got = "a non-tensor" if out is None else "x".join(map(str, out.shape))
            raise ConfigError(f"the {self.role}'s classifier was taken to be {taken}, but its output "
                              f"({got}) is not the logits the {self.role} returns "
                              f"({'x'.join(map(str, logits.shape))}); {fix}")
        self._head_in = int(inp.shape[1])

    @property
    def num_features(self) -> int:
        if self.zoo:
            return int(self.module.num_features)
        if self._num_features is None:
            head = self.classifier
            if self.embedding_spec is None and isinstance(head, nn.Linear):
                return head.in_features  # the hooked embedding is the classifier's input
            raise RuntimeError("Network.probe(example) must run before num_features is known")
        return self._num_features

    @property
    def num_classes(self) -> int | None:
        """The number of logits (None for a feature extractor)."""
        if self.zoo:
            return int(self.module.num_classes)
        if not self.has_logits:
            return None
        head = self.classifier
        if isinstance(head, nn.Linear) and self.embedding_spec is None:
            return head.out_features
        return self._num_classes

    @property
    def has_logits(self) -> bool:
        """Whether the module gives class logits (its output; for ``forward_features``, its
        ``forward_head``); a feature extractor (``embedding="output"``) does not."""
        if self.zoo:
            return True
        if self.embedding_spec == "output":
            return False
        if self.embedding_spec == "forward_features":
            return callable(getattr(self.module, "forward_head", None))
        return True

    @property
    def classifier(self) -> nn.Module | None:
        if self.head_name is None:
            return None
        return self.module.get_submodule(self.head_name)

    def classifier_prefix(self) -> str:
        """The key prefix of the classifier's entries in the module's state dict."""
        return "" if self.head_name is None else self.head_name + "."

    def reset_classifier(self, num_classes: int) -> None:
        """A fresh ``nn.Linear(num_features, num_classes)`` in place of the classifier."""
        if self.zoo:
            self.module.reset_classifier(num_classes)
            return
        if self.head_name is None:
            raise ConfigError(f"the {self.role} has no classifier to replace; set {_key(self.role, 'head')}")
        old = self.classifier
        ref = next(iter(old.parameters()), None) if old is not None else None
        if ref is None:
            ref = next(self.module.parameters())
        width = self._head_in if self._head_in is not None else self.num_features
        new = nn.Linear(width, num_classes, device=ref.device, dtype=ref.dtype)
        parent_name, _, leaf = self.head_name.rpartition(".")
        parent = self.module.get_submodule(parent_name) if parent_name else self.module
        was_hooked = self.embedding_spec is None
        setattr(parent, leaf, new)
        if was_hooked:  # the embedding is the classifier's input: hook the new classifier
            for h in self._handles:
                h.remove()
            self._handles = []
            self._install_hooks(self.embedding_spec, self.map_names)
        self._num_classes = num_classes

    def compile_passes(self, **options) -> None:
        """``torch.compile`` the network's pass (embedding and logits; used on CUDA with
        ``speed.compile``). The wrapped module itself is left as it is, and a copy of the network
        is not compiled."""
        self._compiled = torch.compile(self._pass, **options)
        self.fixed_batch = True

    def close(self) -> None:
        """Remove the hooks this wrapper put on the module (the module is the user's again)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def module_state_dict(self) -> dict:
        return self.module.state_dict()

    def __deepcopy__(self, memo):
        """A copy whose hooks write to the copy (hooks are closures over their Network)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        try:
            module = copy.deepcopy(self.module, memo)
        finally:
            if not self.zoo:
                self._install_hooks(self.embedding_spec, self.map_names)
        mean = None if self.mean is None else self.mean.flatten().tolist()
        std = None if self.std is None else self.std.flatten().tolist()
        new = Network(module, embedding=self.embedding_spec,
                      head=None if self.zoo else self.head_name, mean=mean, std=std,
                      maps=self.map_names or None, role=self.role)
        new._num_features, new._num_classes = self._num_features, self._num_classes
        new._head_in, new._probed, new.head_given = self._head_in, self._probed, self.head_given
        new.channels_last = self.channels_last
        if self.mean is not None:
            new.to(self.mean.device)
        return new.train(self.training)


def _stats(mean, std, role: str):
    if mean is None and std is None:
        return None, None
    if mean is None or std is None:
        raise ConfigError(f"{_key(role, 'mean')} and {_key(role, 'std')} go together: give both or neither")
    try:
        mean = [float(mean)] if isinstance(mean, numbers.Real) else [float(v) for v in mean]
        std = [float(std)] if isinstance(std, numbers.Real) else [float(v) for v in std]
    except (TypeError, ValueError):
        raise ConfigError(f"{_key(role, 'mean')} and {_key(role, 'std')} must be numbers, one per input "
                          f"channel (or one for all), got {mean!r} and {std!r}") from None
    m = torch.as_tensor(mean, dtype=torch.float32)
    s = torch.as_tensor(std, dtype=torch.float32)
    if m.dim() != 1 or m.shape != s.shape or len(m) == 0:
        raise ConfigError(f"{_key(role, 'mean')} and {_key(role, 'std')} must be lists of one value per "
                          f"input channel (or one for all), got {list(mean)} and {list(std)}")
    if not bool(torch.isfinite(m).all() and torch.isfinite(s).all()) or bool((s <= 0).any()):
        raise ConfigError(f"{_key(role, 'std')} must be positive and finite, got {list(std)}")
    return m.reshape(1, -1, 1, 1), s.reshape(1, -1, 1, 1)


class FrozenTeacher:
    """The one place where the teacher is frozen: eval mode and no gradients, never trained.

    Deliberately not an ``nn.Module`` attribute of a method, so that it never appears in a
    method's parameters, state dict or ``train()`` calls. The wrapped module's own
    ``requires_grad`` flags are left as the user set them: no graph is ever built through it.
    """

    def __init__(self, network: Network):
        self.network = network.eval()

    @property
    def model(self) -> Network:
        return self.network

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(embedding, logits or None) of the teacher for a batch of raw inputs."""
        self.network.eval()
        return self.network.features_and_logits(x)

    @torch.no_grad()
    def maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        self.network.eval()
        return self.network.maps_and_logits(x)[0]

    @property
    def num_features(self) -> int:
        return self.network.num_features

    @property
    def has_logits(self) -> bool:
        return self.network.has_logits
