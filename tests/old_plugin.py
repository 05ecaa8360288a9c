"""A plugin written from tdlm's docs before plugin API 1.0, as its author left it: it imports the
registry under its old name `tdlm.plugins` and its nelbo_terms takes logits. tdlm must refuse it in
one line that says what changed (tests/test_plugin_fit.py), never fail at the first training step."""

import torch
import torch.nn.functional as F

from tdlm.components import ComponentConfig, Corruption
from tdlm.plugins import hookimpl  # the old name of tdlm.registry; tdlm.plugin is the front door now


class OldMasking(Corruption):
    """Uniform masking under the linear schedule, its bound written against logits."""

    class Config(ComponentConfig):
        """No options."""

    def corrupt(self, x0, t, generator):
        noise = torch.rand(x0.shape, generator=generator, device=x0.device)
        return torch.where(noise < t[:, None], self.vocab.mask_id, x0)

    def nelbo_terms(self, logits, x0, xt, t):
        ce = F.cross_entropy(logits.transpose(1, 2), x0, reduction="none")
        return ce * (xt == self.vocab.mask_id) / t[:, None]


@hookimpl
def register_corruptions(register):
    register("old-masking", OldMasking)
