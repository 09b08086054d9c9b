"""Evaluation: embeddings and logits of a split, classifier accuracy, nearest class mean (NCM).

Everything here runs in eval mode without augmentation and never trains. Images are uint8
(scaled to [0, 1] here) or the user's float tensors (used as they are), held in memory or read
from a streamed view (:class:`refilled.data.streaming.StreamedImages`, in order, through its
worker processes); every network normalises its input itself
(:class:`refilled.networks.Network`).
"""

from __future__ import annotations

import torch

from refilled.errors import UserError
from refilled.ncm import class_centers, ncm_accuracy, ncm_logits
from refilled.runtime import Dist


def as_input(images: torch.Tensor, device) -> torch.Tensor:
    """A batch of stored images (a tensor, or a few images of a streamed view) as the networks'
    float input on ``device``."""
    if not isinstance(images, torch.Tensor):
        images = images.materialise()
    x = images.to(device)
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


@torch.no_grad()
def predict(model, images: torch.Tensor, device, batch_size: int = 512, *, dist: Dist = Dist(),
            channels_last: bool = False, fixed_batch: bool = False):
    """Embeddings and logits ``(N, D), (N, C)`` of ``images`` (logits None for a network without).

    Under torchrun (``dist``) each rank embeds a contiguous share and the shares are gathered,
    so every rank returns the whole result and no rank waits for another in a collective.
    ``fixed_batch`` pads the last, smaller batch to ``batch_size`` (a compiled network then
    never sees a new shape); ``channels_last`` feeds NHWC batches (CUDA). Both default to what
    the network asks for (:class:`refilled.networks.Network`).
    """
    channels_last = channels_last or getattr(model, "channels_last", False)
    fixed_batch = fixed_batch or getattr(model, "fixed_batch", False)
    was_training = model.training
    model.eval()
    n = len(images)
    per = -(-n // dist.world) if dist.world > 1 else n
    start, stop = dist.rank * per, min(n, (dist.rank + 1) * per)
    embs, logits = [], []
    try:
        if isinstance(images, torch.Tensor):
            chunks = (images[lo:min(lo + batch_size, stop)] for lo in range(start, stop, batch_size))
        else:  # a streamed view: read in order through its worker processes
            chunks = images.batches(batch_size, start, stop, pin=torch.device(device).type == "cuda")
        for chunk in chunks:
            x = as_input(chunk, device)
            real = len(x)
            if fixed_batch and real < batch_size:
                x = torch.cat([x, x.new_zeros(batch_size - real, *x.shape[1:])])
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            z, out = model.features_and_logits(x)
            embs.append(z[:real].float())
            if out is not None:
                logits.append(out[:real].float())
    finally:
        model.train(was_training)
    emb = torch.cat(embs) if embs else None
    out = torch.cat(logits) if logits else None
    if dist.world > 1:
        emb, out = _gather_shares(dist, emb, out, per, n, device)
    if emb is None:
        return torch.zeros(0, 0, device=device), torch.zeros(0, 0, device=device)
    return emb, out


def _gather_shares(dist: Dist, emb, out, per: int, n: int, device):
    """Every rank's rows (padded to ``per``) gathered in rank order, padding dropped."""
    width = torch.tensor([0 if emb is None else emb.shape[1], 0 if out is None else out.shape[1]],
                         device=device)
    width = dist.all_reduce_max(width)
    parts = []
    for t, w in ((emb, int(width[0])), (out, int(width[1]))):
        if w == 0:
            parts.append(None)
            continue
        t = t if t is not None else torch.zeros(0, w, device=device)
        padded = torch.cat([t, t.new_zeros(per - len(t), w)])
        parts.append(dist.gather(padded)[:n])
    return parts[0], parts[1]


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(dim=1) == labels.to(logits.device)).double().mean().item()


def ncm_eval(model, train_images, train_labels, eval_images, eval_labels, device, *,
             num_classes: int | None = None, **predict_kw) -> float:
    """Stage-1 quality: class means of normalised training embeddings, cosine NCM elsewhere."""
    train_emb, _ = predict(model, train_images, device, **predict_kw)
    eval_emb, _ = predict(model, eval_images, device, **predict_kw)
    num_classes = num_classes or int(train_labels.max()) + 1
    return ncm_accuracy(train_emb, train_labels.to(device), eval_emb, eval_labels.to(device), num_classes)


def ncm_predictor(model, train_images, train_labels, num_classes: int, device, **predict_kw):
    """``images -> predicted labels`` by cosine NCM on ``model``'s embedding, with the class
    means of its normalised training embeddings."""
    emb, _ = predict(model, train_images, device, **predict_kw)
    centers = class_centers(emb, train_labels.to(device), num_classes, normalize_inputs=True)
    return lambda images: ncm_logits(predict(model, images, device, **predict_kw)[0], centers).argmax(1)


def classifier_predictor(model, device, **predict_kw):
    """``images -> predicted labels`` by the network's own classifier."""
    return lambda images: predict(model, images, device, **predict_kw)[1].argmax(1)


def split_accuracy(predictor, images: torch.Tensor, labels: torch.Tensor) -> float | None:
    """Accuracy of ``predictor`` on a split (None for an empty split)."""
    if not len(labels):
        return None
    return (predictor(images).cpu() == labels.cpu()).double().mean().item()


def embedding_norm(model, images: torch.Tensor, device, **predict_kw) -> float | None:
    """Mean L2 norm of the raw embedding over ``images`` (the hand-off diagnosis)."""
    if not len(images):
        return None
    emb, _ = predict(model, images, device, **predict_kw)
    return emb.norm(dim=1).mean().item()


# ------------------------------------------------------------------ few-shot episodes


def sample_episodes(labels: torch.Tensor, *, ways: int, shots: int, queries: int, episodes: int,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """N-way K-shot episodes over the labelled pool ``labels`` (classes 0..C-1).

    Returns ``(classes (E, N), support (E, N, K), query (E, N, Q))``: each episode's classes and
    the pool indices of its support and query images (row ``j`` belongs to ``classes[e, j]``).
    Within an episode and class, support and query come from one random permutation of that
    class's images, so they never share an image. All randomness comes from ``generator``.
    """
    labels = labels.long().cpu()
    counts = torch.bincount(labels)
    need = shots + queries
    if ways > len(counts):
        raise UserError(f"fewshot.ways={ways} is more than the {len(counts)} novel classes")
    short = (counts < need).nonzero().flatten().tolist()
    if short:
        raise UserError(
            f"episodes need {shots} support + {queries} query images per class, but class "
            f"{short[0]} has {int(counts[short[0]])} test images; lower fewshot.queries or shots"
        )
    grouped = torch.sort(labels, stable=True).indices  # pool indices, grouped by class
    starts = torch.cumsum(counts, 0) - counts
    classes = torch.rand(episodes, len(counts), generator=generator).argsort(dim=1)[:, :ways]
    keys = torch.rand(episodes, ways, int(counts.max()), generator=generator)
    beyond = torch.arange(keys.shape[2]) >= counts[classes].unsqueeze(2)
    positions = keys.masked_fill(beyond, float("inf")).argsort(dim=2)[:, :, :need]
    picked = grouped[starts[classes].unsqueeze(2) + positions]
    return classes, picked[:, :, :shots], picked[:, :, shots:]


def episode_accuracies(embeddings: torch.Tensor, support: torch.Tensor, query: torch.Tensor) -> list[float]:
    """Nearest-prototype (cosine) accuracy of every episode, from the pool's embeddings."""
    _, ways, shots = support.shape
    queries = query.shape[2]
    dev = embeddings.device
    y_support = torch.arange(ways, device=dev).repeat_interleave(shots)
    y_query = torch.arange(ways, device=dev).repeat_interleave(queries)
    return [ncm_accuracy(embeddings[s.flatten().to(dev)], y_support,
                         embeddings[q.flatten().to(dev)], y_query, ways)
            for s, q in zip(support, query)]
