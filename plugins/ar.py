"""The autoregressive baseline: exact NLL of every token, the first one predicted from a BOS."""

import torch
import torch.nn.functional as F

from tdlm import hookimpl
from tdlm.components import Objective, SequenceScores


class AutoregressiveObjective(Objective):
    causal = True
    default_sampler = "ar"

    def shifted_inputs(self, x0):
        """[BOS, x_0 .. x_{N-2}]: position i predicts x_i, so all N tokens are scored (MATH.md 2)."""
        bos = torch.full_like(x0[:, :1], self.vocab.bos_id)
        return torch.cat([bos, x0[:, :-1]], dim=1)

    def token_nll(self, net, x0):
        logits = net(self.shifted_inputs(x0))
        nll = F.cross_entropy(logits.flatten(0, 1).float(), x0.flatten(), reduction="none")
        return nll.view(x0.shape), logits

    def loss(self, net, x0, generator):
        nll, _ = self.token_nll(net, x0)
        return nll.mean(), {}

    @torch.no_grad()
    def score(self, net, x0, *, generator, t_samples):
        nll, logits = self.token_nll(net, x0)
        correct = (logits.argmax(-1) == x0).sum().double()
        return SequenceScores(
            nll=nll.double().sum(-1), is_bound=False, extras={"next_token_correct": correct.view(1)}
        )


@hookimpl
def register_objectives(register):
    register("ar", AutoregressiveObjective)
