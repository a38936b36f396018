"""InfiniGen's prefill side: which R skewed columns each (sequence, KV head) keeps, and the partial
keys of its prompt on those columns (the partial key cache that speculation scores against).
A mixin of InfiniGenKV (minigen/kv/infinigen.py), whose state (skew, col_score, a_sel, pk, the
prefill staging buffer, the row eviction plan) it fills."""
from __future__ import annotations

import torch


class PrefillColumns:
    def _prefill_partial_keys(self, layer: int, q: torch.Tensor, k: torch.Tensor) -> None:
        """Pick each sequence's R skewed columns per KV head from every prompt token it has
        prefilled so far (column sums of |skewed q| + |skewed k|, accumulated over prefill chunks,
        so the choice does not depend on how the engine packed prompts into chunks: a prompt whose
        first chunk held a few tokens is not stuck with columns chosen from those) and write the
        partial keys of the new tokens. A chunk that continues a sequence may change its columns,
        so when it ends the prompt (meta.host_done; every chunk when not given), the partial keys
        of the earlier tokens are rewritten to the final columns, from the prefill staging buffer
        that prefill attention has just filled with their keys (no extra transfer; once per
        prompt; their rows are their positions: a continued sequence fits in the pool). Decode
        reads partial keys only after the prompt is complete. Runs after the prefill attention."""
        meta, j, G = self.meta, layer - self.dense_layers, self.group
        A = self.skew[layer]                                                   # (Hkv, D, D)
        start, pks = 0, []
        done = meta.host_done or [True] * len(meta.host_slots)
        for b, (slot, n0, n) in enumerate(zip(meta.host_slots, meta.host_start, meta.host_new)):
            qs = q[start:start + n].float().view(n, self.num_kv_heads, G, -1)  # (n, Hkv, G, D)
            ks = k[start:start + n].float()                                    # (n, Hkv, D)
            score = self._column_score(torch.einsum("ngjd,gde->ngje", qs, A),  # skewed q, k
                                       torch.einsum("ngd,gde->nge", ks, A))    # (Hkv, D)
            if n0 == 0:                                                        # a new sequence
                self.col_score[j, slot] = score
            else:
                self.col_score[j, slot] += score
            sel = self.col_score[j, slot].topk(self.R, dim=-1).indices.sort(-1).values   # (Hkv, R)
            self.a_sel[j, slot] = torch.gather(A, 2, sel[:, None, :].expand(-1, A.shape[1], -1)).to(self.dtype)
            a_sel = self.a_sel[j, slot].float()                                # (Hkv, D, R)
            if n0 and done[b]:                                                 # earlier tokens, final columns
                prefix = torch.einsum("ngd,gdr->ngr", self.prefill_k[b, :n0].float(), a_sel)
                self.pk[j, slot, :, :, :n0] = prefix.permute(1, 2, 0).to(self.dtype)
            pk = torch.einsum("ngd,gdr->ngr", ks, a_sel)                       # (n, Hkv, R)
            if self.evictor:
                pks.append(pk)
            else:
                self.pk[j, slot, :, :, n0:n0 + n] = pk.permute(1, 2, 0).to(self.dtype)
            start += n
        if self.evictor:   # the kept tokens' partial keys, by row
            plan = self.evictor.plan
            self.pk[j][plan["slot"], :, :, plan["row"]] = torch.cat(pks)[plan["tok"]].to(self.dtype)

    @staticmethod
    def _column_score(q_sk: torch.Tensor, k_sk: torch.Tensor) -> torch.Tensor:
        """What a skewed column carries over a chunk: sum |q| + sum |k|, (Hkv, D); the R largest win."""
        return q_sk.abs().sum((0, 2)) + k_sk.abs().sum(0)
