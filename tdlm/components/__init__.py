"""The components layer: what each kind of component receives and returns (the interface a plugin
implements), and the helpers components share. Plugins import all of it from `tdlm.plugin`.

Every component class has a nested pydantic `Config` (the keys of its recipe section besides
`name`; unknown keys are rejected) and is built by tdlm as shown in each class's `__init__`.
Shapes: B sequences of N positions; V real tokens; the mask token is id V (`vocab.mask_id`),
one past the last real token. The denoiser `net(x) -> logits [B, N, V]` never scores the mask
token, so the SUBS rule "the mask id has probability 0" holds by construction. Training and
evaluation hand a corruption a `Denoised` (tdlm.head) instead of logits: the output head is
applied only at the masked positions, where the NELBO has terms.

Flow: data -> corruption (forward process, uses a schedule) -> model -> objective -> step ->
eval (objective.score) -> sample (sampler, uses the corruption's reverse kernel).

One file per job: common (Config base, VocabInfo, RunContext, the placeholder marker, the draws),
schedule, corruption, objective, sampler (the four interfaces), build (build_component), fit (what
the registry checks of a registered class), and the samplers' shared helpers: grids (time grids,
commit counts), kernel (the ancestral reverse kernel), next_token (the AR next-token
distribution), draft (draft networks for the speculative samplers).

A component may say which methods it calls on the others (`needs_corruption`, ...): a recipe
whose parts do not fit is refused when it is resolved (`tdlm run --check`), not at the first
eval or sample. A method counts as provided when the class overrides the base's placeholder
(the ones marked `@placeholder` raise NotImplementedError); `implements(cls, name)` tells.
"""

from tdlm.components.build import build_component
from tdlm.components.common import (ComponentConfig, RunContext, VocabInfo, implements, placeholder, required,
                                    sample_categorical, stratified_times)
from tdlm.components.corruption import Corruption, Denoiser
from tdlm.components.objective import Objective, SequenceScores
from tdlm.components.sampler import (STEPS_PER_POSITION, SampleOutput, Sampler, SamplerOptionError, SampleStats,
                                     check_steps)
from tdlm.components.schedule import Schedule
from tdlm.head import Denoised

__all__ = ["ComponentConfig", "Corruption", "Denoised", "Denoiser", "Objective", "RunContext", "STEPS_PER_POSITION",
           "SampleOutput", "SampleStats", "Sampler", "SamplerOptionError", "Schedule", "SequenceScores", "VocabInfo",
           "build_component", "check_steps", "implements", "placeholder", "required", "sample_categorical",
           "stratified_times"]
