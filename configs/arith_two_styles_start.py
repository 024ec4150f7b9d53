"""An SFT start whose samples differ by the way they answer: RCRL's synthetic start.

    python launch/train.py --config=configs/arith_two_styles_start.py --workdir=runs/sft2

`configs/arith_start.py`'s model and schedule for 1,000 steps on train data
where half the solutions (chosen by a hash of the question) are replaced by
their bare final line (`data.bare_answer_fraction`). The model learns both
ways: it works a problem out line by line or writes the answer at once.
Measured
(2026-12-02, 256 held-out questions, 8 samples at temperature 1): greedy
maj@1 58%, bare answers 62% of the greedy ones; sample accuracy 62% for
worked solutions against 38% for bare ones (one-step questions 82% against
52%, two-step 36% against 22%).

`arith_start.py`'s samples differ only by arithmetic slips drawn from the
model's own spread, which no return token can name; here good and bad
samples differ also in a choice the model makes at the first word, as
solutions to GSM8K differ by the path taken.
"""

from configs import arith_start


def get_config():
    config = arith_start.get_config()
    config.data.bare_answer_fraction = 0.5
    config.train.num_steps = 1000
    return config
