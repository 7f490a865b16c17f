"""Gradient methods: the loss stays DPO; the gradient is projected onto the reference preference direction.

projgrad  G ← Σ_b [u_b u_bᵀ G_b + β(I − u_b u_bᵀ)G_b]   on each LoRA-B weight gradient (per pair)
  update  ΔB ← PΔB + β(I − P)ΔB                    on each LoRA-B optimiser update (`project_updates`)
projbp    g ← s(⟨g,u_b⟩)u_b + β(g − ⟨g,u_b⟩u_b)       on each adapted module's output gradient
u_b = normalise(pooled(out⁺_ref) − pooled(out⁻_ref)), one per pair and module (DESIGN §3, §5);
P = the orthogonal projector on span{u_b} of all pairs of one optimiser step.

Shapes: b pairs, R input rows, t tokens, o = d_out of a module, k LoRA rank. Padded layout:
R = 2b rows [chosen; rejected], a pair's two rows share u_b; shared-prompt layout: R = b rows
prompt + chosen + rejected, one per pair (`PairBatch.row_pair` maps rows to pairs).
Projections are computed in float32.

Usage (the policy forward AND backward happen inside the context):
    dirs, ref = reference_directions(model, batch)     # or from the reference cache
    with projgrad(model, dirs, beta=0.0, rows=batch.row_pair):
        pol = sequence_logps(model, batch); loss = dpo_loss(...)[0].mean(); loss.backward()

Both projections are linear in the gradient per pair (projbp with identity s and no renorm), so
in the shared-prompt layout, where a prompt token carries the sum of its chosen and rejected
gradients, they give the padded layout's result; leaky s and renorm act per response row and
need the padded layout.

(differs: the earlier code used sample 0's direction for the whole batch, projected LoRA-A in
the wrong space and re-projected accumulated gradients. Here each pair's contribution is
projected with its own u_b during its own backward, so gradient accumulation over micro-batches
gives the large-batch gradient.)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from reprpo.data.tokenize import PairBatch
from reprpo.model.capture import pool
from reprpo.model.forward import SeqLogps, adapter_disabled, base_model, sequence_logps
from reprpo.model.refcache import directions_from_pooled

RECTIFY = ("identity", "leaky")


def _active_adapter(name: str, m: nn.Module) -> str | None:
    """The one active adapter of a LoRA layer that has a Linear lora_B, else None."""
    active = [a for a in m.active_adapters if a in m.lora_B]
    if not active:
        return None
    if len(active) > 1:
        raise ValueError(f"{name}: {len(active)} active LoRA adapters {active}; projgrad/projbp support one.")
    a = active[0]
    if not isinstance(m.lora_B[a], nn.Linear):
        return None  # conv / other LoRA layers: not a Linear's output space
    if getattr(m, "merged", False):
        raise ValueError(f"{name}: the LoRA adapter is merged into the base weights; unmerge it before training.")
    if a in getattr(m, "lora_variant", {}):
        raise ValueError(f"{name}: LoRA variant {type(m.lora_variant[a]).__name__} (e.g. DoRA) is not supported by projgrad/projbp.")
    return a


def lora_modules(model) -> dict[str, nn.Module]:
    """name -> LoRA-wrapped Linear (`.base_layer`, `.lora_A[a]`, `.lora_B[a]` for the active adapter a).

    Names are relative to the transformers model inside any PEFT / DDP wrapper, so the same
    model gives the same keys wrapped or not."""
    from peft.tuners.lora import LoraLayer

    return {
        n: m
        for n, m in base_model(model).named_modules()
        if isinstance(m, LoraLayer) and _active_adapter(n, m) is not None
    }


def _lora_B(name: str, m: nn.Module) -> nn.Linear:
    return m.lora_B[_active_adapter(name, m)]


@torch.no_grad()
def reference_directions(model, batch: PairBatch) -> tuple[dict[str, Tensor], SeqLogps]:
    """u_b = normalise(pooled(out⁺_ref) − pooled(out⁻_ref)) per LoRA module, (b, o) float32; + ℓ_ref.

    One reference pass (adapter off): forward hooks capture each wrapped module's output (the
    base layer's, d_out wide), mean-pooled over response tokens per row; the same pass returns
    the reference log-probs, so DPO needs no second reference forward. A pair whose two responses
    give identical pooled outputs has no direction: its u_b is 0 (F.normalize). Either layout;
    not with a batch prefix (its tokens belong to every pair)."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA-wrapped Linear modules: projgrad/projbp need a LoRA adapter (see train.make_lora).")
    if batch.prefix_len:
        raise ValueError("projgrad/projbp need each pair's own tokens: collate without a batch prefix (share_prefix=False).")
    pooled: dict[str, Tensor] = {}

    def capture(name: str):
        def hook(mod, args, out):
            if name in pooled:
                raise RuntimeError(f"{name} ran twice in one forward; reference directions assume one call per module.")
            pooled[name] = pool(out.float()[batch.rows], response_mask=batch.response_mask, attention_mask=batch.pool_mask)  # (2b, o) response mean

        return hook

    handles = []
    try:
        with adapter_disabled(model):
            for n, mod in mods.items():
                handles.append(mod.register_forward_hook(capture(n)))
            ref = sequence_logps(model, batch)
    finally:
        for h in handles:
            h.remove()
    dirs = {}
    for n in mods:
        if n not in pooled:
            raise RuntimeError(f"{n} was not called in the reference forward; cannot compute its direction.")
        dirs[n] = directions_from_pooled(pooled[n])  # (b, o)
    return dirs, ref


def _checked_modules(model, dirs: dict[str, Tensor]) -> dict[str, nn.Module]:
    mods = lora_modules(model)
    if set(mods) != set(dirs):
        missing, extra = sorted(set(mods) - set(dirs)), sorted(set(dirs) - set(mods))
        raise ValueError(
            f"directions do not match the model's LoRA modules (missing {missing[:3]}, unexpected {extra[:3]}); "
            "compute them with reference_directions(model, batch) on this model."
        )
    return mods


def _rows_u(u: Tensor, n_rows: int, name: str, rows: Tensor | None = None) -> Tensor:
    """(b, o) -> (R, o): each input row's pair direction. `rows` (R,) gives the pair of each
    input row (PairBatch.row_pair); None is the padded layout, where rows i and b + i use u_i."""
    b = u.shape[0]
    if rows is None:
        rows = torch.arange(2 * b) % max(b, 1)
    if n_rows != rows.shape[0] or (rows.numel() and int(rows.max()) >= b):
        raise RuntimeError(
            f"{name}: directions are for {b} pairs but the forward has {n_rows} rows (expected {rows.shape[0]}); "
            "compute reference_directions on the same batch as the policy pass and pass rows=batch.row_pair."
        )
    return u.float()[rows.to(u.device)]


def projected_weight_grad(g: Tensor, a: Tensor, u: Tensor, *, beta: float, rows: Tensor | None = None) -> Tensor:
    """∇B = Σ_b [u_b u_bᵀ G_b + β(I − u_b u_bᵀ) G_b],  G_b = Σ_{rows of pair b, t} g_t a_tᵀ
    ours (DESIGN §5 projgrad), per pair; g (R, t, o) grad of lora_B's output, a (R, t, k) its input,
    u (b, o), `rows` the pair of each input row (None: padded) -> (o, k) float32.

    Since u_bᵀ G_b = Σ_{rows, t} ⟨g_t, u_b⟩ a_tᵀ, no per-pair (o, k) matrix is formed."""
    r, o, k = g.shape[0], g.shape[-1], a.shape[-1]
    g, a = g.float().reshape(r, -1, o), a.float().reshape(r, -1, k)  # (R, t, o), (R, t, k)
    uu = _rows_u(u.to(g.device), r, "projgrad", rows)  # (R, o)
    s = torch.einsum("rto,ro->rt", g, uu)  # ⟨g_t, u_b⟩
    c = torch.einsum("rt,rtk->rk", s, a)  # u_bᵀ G_row
    along = torch.einsum("ro,rk->ok", uu, c)  # Σ_b u_b u_bᵀ G_b
    if beta == 0:
        return along
    full = torch.einsum("rto,rtk->ok", g, a)  # Σ_b G_b
    return along + beta * (full - along)


@contextmanager
def projgrad(model, dirs: dict[str, Tensor], *, beta: float, rows: Tensor | None = None) -> Iterator[None]:
    """G ← Σ_b [u_b u_bᵀ G_b + β(I − u_b u_bᵀ)G_b] on every LoRA-B weight gradient; LoRA-A untouched.
    ours (DESIGN §5 "projgrad"); β = 0 keeps only the preference directions, β = 1 is plain DPO.
    `rows`: the pair of each input row of the batch (PairBatch.row_pair); None: padded layout.

    LoRA-B's gradient (o × k) has its columns in the module's output space, where u_b lives, so
    it is projected. LoRA-A's gradient (k × d_in) lives in the input space, where u_b means
    nothing: it is left exactly as DPO's (differs: the earlier code projected A too).

    Mechanism: a forward hook on each lora_B Linear keeps its input a and hooks its output;
    when that output's gradient g arrives (always before lora_B.weight's gradient, which
    autograd computes from it) the projected per-pair weight gradient is summed into a stash;
    a hook on lora_B.weight then returns the stash in place of the raw gradient, and autograd
    adds it to `.grad` as usual (so accumulation over micro-batches sums projected pieces).
    The scaling α/r multiplies g already; it does not change directions."""
    mods = _checked_modules(model, dirs)
    stash: dict[str, Tensor] = {}  # name -> projected ∇B of the running backward
    handles: list = []  # module and parameter hooks
    grad_handles: list = []  # tensor hooks on lora_B outputs, one per forward call

    def on_forward(name: str):
        u = dirs[name]

        def hook(lin, args, y):
            if not (torch.is_grad_enabled() and y.requires_grad):
                return
            a = args[0].detach()  # (R, t, k)
            _rows_u(u, y.shape[0], name, rows)  # fail in the forward, not deep inside backward

            def on_grad(g):  # g: (R, t, o), fires before lora_B.weight's gradient
                w = projected_weight_grad(g, a, u, beta=beta, rows=rows)
                stash[name] = stash[name] + w if name in stash else w

            grad_handles.append(y.register_hook(on_grad))

        return hook

    def on_weight_grad(name: str):
        def hook(grad):
            if name not in stash:
                raise RuntimeError(
                    f"projgrad: {name}.lora_B got a gradient without its projection; "
                    "run the policy forward inside the projgrad context."
                )
            return stash.pop(name).to(dtype=grad.dtype, device=grad.device)

        return hook

    try:
        for name, mod in mods.items():
            lin = _lora_B(name, mod)
            if lin.bias is not None:
                raise ValueError(f"{name}: lora_B has a bias (lora_bias=True); projgrad does not project it.")
            handles.append(lin.register_forward_hook(on_forward(name)))
            if lin.weight.requires_grad:
                handles.append(lin.weight.register_hook(on_weight_grad(name)))
        yield
    finally:
        for h in handles + grad_handles:
            h.remove()
        stash.clear()


def lora_B_weights(model, dirs: dict[str, Tensor] | None = None) -> dict[str, nn.Parameter]:
    """name -> the active adapter's lora_B.weight (o, k) of every LoRA module (`lora_modules` names);
    with `dirs`, checked to be the modules the directions were computed for."""
    mods = lora_modules(model) if dirs is None else _checked_modules(model, dirs)
    return {n: _lora_B(n, m).weight for n, m in mods.items()}


def projected_update(delta: Tensor, u: Tensor, *, beta: float) -> Tensor:
    """ΔB ← PΔB + β(I − P)ΔB, P the orthogonal projector on span{u_1..u_n}
    ours (DESIGN §5 projgrad, `method.project update`); delta (..., o, k), u (..., n, o) -> (..., o, k) float32.

    Leading dimensions are a batch (modules of one shape). P = QQᵀ with Q the left singular
    vectors of uᵀ whose singular value exceeds max(n, o)·eps·σ_max (numpy's matrix_rank
    tolerance): a pair whose u_b is 0, or repeats another's direction, adds nothing to the span;
    with no direction at all P = 0 and ΔB ← βΔB.

    Worked, o = 3, u = [(1, 0, 0), (1, 1, 0)/√2, (0, 0, 0)]: span = the first two axes, so
    P zeroes row 3 of ΔB: ΔB = [[1, 2], [3, 4], [5, 6]], β = 0.5 -> [[1, 2], [3, 4], [2.5, 3]]."""
    d, u = delta.float(), u.float()
    Q, S, _ = torch.linalg.svd(u.transpose(-1, -2), full_matrices=False)  # (..., o, m), (..., m); m = min(o, n)
    tol = max(u.shape[-2], u.shape[-1]) * torch.finfo(S.dtype).eps * S.amax(dim=-1, keepdim=True)  # (..., 1)
    Q = Q * (S > tol).to(Q.dtype)[..., None, :]  # columns beyond the numerical rank -> 0
    along = Q @ (Q.transpose(-1, -2) @ d)  # PΔB
    return along if beta == 0 else along + beta * (d - along)


def _all_pairs(dirs: dict[str, Tensor]) -> dict[str, Tensor]:
    """Every process's directions, stacked: (n, o) -> (Σ_processes n, o) per module.

    Under multi-process training the all-reduced update is the same on every process, so every
    process must project it on the same span: the union of all processes' pairs. Shorter
    stacks are padded with zero rows, which add nothing to a span."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return dirs
    names = sorted(dirs)
    n = torch.tensor([dirs[names[0]].shape[0]], device=dirs[names[0]].device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    n_max = int(max(sizes))
    flat = torch.cat([torch.nn.functional.pad(dirs[k].float(), (0, 0, 0, n_max - dirs[k].shape[0])).reshape(-1)
                      for k in names])  # one collective for all modules
    parts = [torch.empty_like(flat) for _ in sizes]
    dist.all_gather(parts, flat)
    out, start = {}, 0
    for k in names:
        size = n_max * dirs[k].shape[1]
        out[k] = torch.cat([p[start:start + size].reshape(n_max, -1) for p in parts])  # (W·n_max, o)
        start += size
    return out


@torch.no_grad()
def project_updates(model, before: dict[str, Tensor], dirs: dict[str, Tensor], *, beta: float) -> None:
    """B ← B₀ + PΔB + β(I − P)ΔB, ΔB = B − B₀, for every LoRA-B weight, in place.
    ours (DESIGN §5 projgrad, `method.project update`); `before` name -> B₀ (o, k) before the
    optimiser step, `dirs` name -> (n, o) the directions of every pair of that step.

    Modules whose (o, k) agree are projected in one batched SVD (a handful of shapes, not one
    call per module); under multi-process training the span is that of all processes' pairs."""
    weights = lora_B_weights(model, dirs)
    if set(before) != set(weights):
        raise RuntimeError("project_updates: the snapshot of LoRA-B does not match the model's LoRA modules; "
                           "take it with lora_B_weights(model) before the optimiser step.")
    dirs = _all_pairs(dirs)
    groups: dict[tuple, list[str]] = {}
    for n, w in weights.items():
        groups.setdefault((tuple(w.shape), w.device), []).append(n)
    for names in groups.values():
        b0 = torch.stack([before[n].to(weights[n].device, torch.float32) for n in names])  # (m, o, k)
        delta = torch.stack([weights[n].float() for n in names]) - b0  # (m, o, k)
        u = torch.stack([dirs[n].to(b0.device) for n in names])  # (m, n, o)
        new = b0 + projected_update(delta, u, beta=beta)
        for n, w in zip(names, new, strict=True):
            weights[n].copy_(w)


def projbp_needs_padded(rectify: str, renorm: bool) -> bool:
    """leaky s and renorm are not linear in g: a shared prompt token's summed chosen + rejected
    gradient would be rewritten differently from the two rows' separate gradients."""
    return rectify != "identity" or renorm


def rewrite_grad_output(
    g: Tensor, u: Tensor, *, beta: float, rectify: str = "identity", leak: float = 0.0, renorm: bool = False,
    rows: Tensor | None = None,
) -> Tensor:
    """g ← s(⟨g,u_b⟩)u_b + β(g − ⟨g,u_b⟩u_b) per row and token; g (R, t, o), u (b, o) -> (R, t, o).
    ours (DESIGN §5 "projbp"). `rows`: the pair of each input row (None: padded [chosen; rejected]).

    s = identity, or "leaky": descent moves activations by −g, so a chosen row's component is
    kept when ⟨g,u⟩ < 0 (moves along +u), a rejected row's when ⟨g,u⟩ > 0 (moves along −u); the
    other sign is multiplied by `leak`. renorm: rescale each token's new g to the old ‖g‖
    (a token whose new g is 0 stays 0). Both need the padded layout (`projbp_needs_padded`).

    Worked, u = (1, 0), g = (2, 3), ⟨g,u⟩ = 2, β = 0.5:
      identity: 2·(1, 0) + 0.5·((2, 3) − (2, 0)) = (2, 1.5)
      leaky, leak 0.1, chosen row (⟨g,u⟩ > 0 is the wrong sign): 0.1·2·(1, 0) + (0, 1.5) = (0.2, 1.5)
      leaky, rejected row (right sign): (2, 1.5)
      renorm: (2, 1.5)·√13/2.5"""
    if rectify not in RECTIFY:
        raise ValueError(f"projbp rectify={rectify!r}; choose one of {RECTIFY}.")
    r, b, o = g.shape[0], u.shape[0], g.shape[-1]
    if projbp_needs_padded(rectify, renorm) and r != 2 * b:
        raise ValueError(f"projbp rectify={rectify} / renorm={renorm} act per response row: they need the padded "
                         f"[chosen; rejected] layout ({2 * b} rows, got {r}); set speed.share_prompt false.")
    g32 = g.float().reshape(r, -1, o)  # (R, t, o)
    uu = _rows_u(u.to(g.device), r, "projbp", rows)  # (R, o)
    s = torch.einsum("rto,ro->rt", g32, uu)[..., None]  # (R, t, 1) ⟨g, u_b⟩
    s_new = s
    if rectify == "leaky":
        want = torch.cat([-torch.ones(b), torch.ones(b)]).to(g.device)[:, None, None]  # sign kept: chosen −, rejected +
        s_new = torch.where(s * want > 0, s, leak * s)
    new = (s_new - beta * s) * uu[:, None, :]  # s_new·u + β(g − s·u) = β·g + (s_new − β·s)·u
    if beta:
        new = new.add_(g32, alpha=beta)
    if renorm:
        new = new * (g32.norm(dim=-1, keepdim=True) / new.norm(dim=-1, keepdim=True).clamp(min=1e-30))
    return new.reshape(g.shape).to(g.dtype)


@contextmanager
def projbp(
    model,
    dirs: dict[str, Tensor],
    *,
    beta: float,
    rectify: str = "identity",
    leak: float = 0.0,
    renorm: bool = False,
    rows: Tensor | None = None,
) -> Iterator[None]:
    """g ← s(⟨g,u_b⟩)u_b + β(g − ⟨g,u_b⟩u_b) on the output gradient of every LoRA-wrapped module.
    ours (DESIGN §5 "projbp"); see `rewrite_grad_output` for s, leak and renorm. `rows`: the pair
    of each input row (PairBatch.row_pair); None: padded layout.

    The rewritten g flows on into the module's own LoRA-A/B and into every module below it, so
    (unlike projgrad) all upstream gradients change. With β = 1, identity, no renorm it is DPO."""
    if rectify not in RECTIFY:
        raise ValueError(f"projbp rectify={rectify!r}; choose one of {RECTIFY}.")
    mods = _checked_modules(model, dirs)
    handles: list = []
    grad_handles: list = []

    def on_forward(name: str):
        u = dirs[name]

        def hook(mod, args, y):
            if not (torch.is_grad_enabled() and y.requires_grad):
                return
            _rows_u(u, y.shape[0], name, rows)
            if projbp_needs_padded(rectify, renorm) and y.shape[0] != 2 * u.shape[0]:
                raise ValueError(f"projbp rectify={rectify} / renorm={renorm} act per response row: they need the "
                                 "padded [chosen; rejected] layout; set speed.share_prompt false.")
            grad_handles.append(y.register_hook(
                lambda g: rewrite_grad_output(g, u, beta=beta, rectify=rectify, leak=leak, renorm=renorm, rows=rows)))

        return hook

    try:
        for name, mod in mods.items():
            handles.append(mod.register_forward_hook(on_forward(name)))
        yield
    finally:
        for h in handles + grad_handles:
            h.remove()
