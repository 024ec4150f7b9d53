"""An SFT start whose samples differ by the way they answer: RCRL's synthetic start.

    python launch/train.py --config=configs/arith_two_styles_start.py --workdir=runs/sft2

`configs/arith_start.py`'s model for 1,000 steps, its cosine decaying to 10% of
the peak rate (the house default), on train data where half the solutions
(chosen by a hash of the question) are replaced by their bare final line
(`data.bare_answer_fraction`). The model learns both ways: it works a
problem out line by line or writes the answer at once. Measured (2026-12-02,
256 held-out questions, greedy and 8 samples at temperature 1; trained on
one device / on eight): greedy maj@1 61.7 / 60.5%, bare answers 59 / 62% of
the greedy ones, right 51 / 49% of the time against 77 / 79% for worked
ones; sample accuracy 69% for worked solutions against 39 / 43% for bare
ones.

`arith_start.py`'s samples differ only by arithmetic slips drawn from the
model's own spread, which no return token can name; here good and bad
samples differ also in a choice the model makes at the first word, as
solutions to GSM8K differ by the path taken. The rate must decay: held at
77.5% of its peak to the end, as `arith_start.py` holds it, the one- and
eight-device runs of this config parted after step ~250 (float rounding)
into starts whose worked solutions were as right as their bare ones (60
against 52% greedily on eight devices), and RCRL's gain from them ranged
from +1.2 to +11.3 points (docs/results-synthetic.md).
"""

from configs import arith_start


def get_config():
    config = arith_start.get_config()
    config.data.bare_answer_fraction = 0.5
    config.train.num_steps = 1000
    config.optim.final_lr_fraction = 0.1
    return config
