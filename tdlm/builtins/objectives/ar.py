"""The autoregressive baseline: exact NLL of every token, the first one predicted from a BOS."""

import torch

from tdlm.plugin import Objective, SequenceScores, all_positions_scores, hookimpl


class AutoregressiveObjective(Objective):
    """Next-token cross-entropy under a causal mask: training loss and exact NLL."""

    causal = True
    default_sampler = "ar"
    # score_takes_maskable stays False: lm-eval scores a continuation with shifted_inputs instead

    def shifted_inputs(self, x0):
        """[BOS, x_0 .. x_{N-2}]: position i predicts x_i, so all N tokens are scored (docs/maths.md section 2)."""
        bos = torch.full_like(x0[:, :1], self.vocab.bos_id)
        return torch.cat([bos, x0[:, :-1]], dim=1)

    def token_nll(self, net, x0):
        """-log p(x0_i | x0_<i) [B, N] float32, the head applied in chunks (no [B, N, V] logits)."""
        return all_positions_scores(net, self.shifted_inputs(x0), x0)

    def loss(self, net, x0, generator):
        return self.token_nll(net, x0).mean(), {}

    @torch.no_grad()
    def score(self, net, x0, *, generator, t_samples):
        nll, argmax = all_positions_scores(net, self.shifted_inputs(x0), x0, with_argmax=True)
        correct = (argmax == x0).sum().double()
        return SequenceScores(
            nll=nll.double().sum(-1), is_bound=False, extras={"next_token_correct": correct.view(1)}
        )


@hookimpl
def register_objectives(register):
    register("ar", AutoregressiveObjective)
