"""The pieces of iterated RLHF: the pair chooser against hand-made ensembles, the fragment share, and
the simulated crowd's noise against the real raters' spread."""
import numpy as np
import pytest
import torch

from palm_rlhf import PaLM, PaLMConfig
from palm_rlhf.crowd import GoldCrowd, individual_ratings, matched_noise_sd, noisy_ratings, rater_spread, simulated_spread
from palm_rlhf.reward import RewardModel, score_texts
from palm_rlhf.rounds import candidate_pairs, choose_pairs, fragment_share, fragments, pair_priorities


def test_candidate_pairs_are_every_pair_once():
    assert candidate_pairs(3).tolist() == [[0, 1], [0, 2], [1, 2]]


def test_disagreement_picks_the_pair_the_members_split_on():
    # two members, one prompt, three responses: they agree on 0 < 1 and on 0 < 2 and split on (1, 2)
    scores = np.array([[[0.0, 2.0, 3.0]], [[0.0, 3.0, 2.0]]])
    priorities = pair_priorities(scores, "disagreement", np.random.default_rng(0))
    assert priorities.argmax() == 2  # the candidate (1, 2)
    # by hand: after standardising, each member's P(1 > 2) is sigmoid(-+d); their spread is |sigmoid(d) - 1/2|
    z = (np.array([0.0, 2.0, 3.0]) - 5 / 3) / np.std([0.0, 2.0, 3.0])
    p = 1 / (1 + np.exp(-(z[1] - z[2])))
    assert priorities[0, 2] == pytest.approx(np.std([p, 1 - p]))
    assert choose_pairs(scores, 1, "disagreement") == [(0, 1, 2)]


def test_margin_picks_the_closest_call_and_uniform_every_prompt_alike():
    scores = np.array([[[0.0, 1.0], [0.0, 0.1], [0.0, 3.0]]])  # one member, three prompts, two responses each
    assert choose_pairs(scores, 2, "margin") == [(1, 0, 1), (0, 0, 1)]
    counts = np.zeros(3)
    for seed in range(300):
        for prompt, _, _ in choose_pairs(scores, 1, "uniform", seed=seed):
            counts[prompt] += 1
    assert counts.min() > 70  # about 100 each


def test_at_most_per_prompt_pairs_and_clear_errors():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(3, 4, 4))  # 4 prompts, 6 candidate pairs each
    chosen = choose_pairs(scores, 8, "disagreement", per_prompt=2)
    assert len(chosen) == len(set(chosen)) == 8 and all(np.bincount([p for p, _, _ in chosen]) == 2)
    with pytest.raises(ValueError, match="9 pairs asked for, but 4 prompts"):
        choose_pairs(scores, 9, "disagreement", per_prompt=2)
    with pytest.raises(ValueError, match="at least two reward models"):
        choose_pairs(scores[:1], 1, "disagreement")
    with pytest.raises(ValueError, match="unknown chooser 'best'"):
        choose_pairs(scores, 1, "best")


def test_fragments_are_recurring_words_no_human_wrote():
    vocabulary = {"a", "great", "film", "dull"}
    responses = ["a great film Ole", "a dull film Ole!", "a great flim", "great film"] + ["a film"] * 396
    assert fragments(responses, vocabulary) == {"ole": 2}  # "flim" appears once: a slip, not a quirk
    assert fragment_share(responses, vocabulary) == pytest.approx(2 / 400)
    assert fragment_share(responses[:3] * 100, vocabulary) == pytest.approx(1.0)  # ole 2/3, flim 1/3 recur


def test_the_crowds_noise_spreads_as_the_real_raters_do():
    ratings = [r for name in ("movieReviewSnippets", "tweets", "amazonReviewSnippets", "nytEditorialSnippets")
               for r in individual_ratings(name)]
    assert len(ratings) == 23703 and all(all(-4 <= x <= 4 for x in r) for r in ratings[:100])
    target = rater_spread(ratings)
    assert 0.85 < target < 0.95  # 0.891: the files' pooled within-text standard deviation
    means = np.array([np.mean(r) for r in ratings])[::5]
    noise = matched_noise_sd(means, target)
    assert simulated_spread(means, noise, seed=7) == pytest.approx(target, rel=0.02)  # other draws than the fit's
    assert noise < target  # rounding adds spread of its own
    ratings_drawn = noisy_ratings(np.full(10000, 3.8), noise, np.random.default_rng(0))
    assert ratings_drawn.max() == 4 and ratings_drawn.min() >= -4 and ratings_drawn.dtype.kind == "i"


def test_a_gold_raters_answers_follow_the_gold_model_and_repeat(tmp_path):
    torch.manual_seed(0)
    gold = RewardModel(PaLM.from_config(PaLMConfig.from_name("tiny")))
    torch.nn.init.normal_(gold.to_pred.weight, std=1.0)
    texts = [("The movie is", f" response {i} " + "x" * i) for i in range(8)]
    scores = score_texts(gold, texts).numpy()
    slope = 6 / (scores.max() - scores.min())  # the 8 texts spread over 6 of the 9 ratings
    crowd = GoldCrowd(gold, slope=slope, intercept=-slope * scores.mean(), noise_sd=0.0)
    assert np.allclose(crowd.human_scale(texts), slope * (scores - scores.mean()))
    best, worst = texts[int(scores.argmax())][1], texts[int(scores.argmin())][1]
    assert crowd.judge("r1", "The movie is", best, worst) == "a" and crowd.judge("r1", "The movie is", worst, best) == "b"
    noisy = GoldCrowd(gold, slope=slope, intercept=-slope * scores.mean(), noise_sd=3.0, seed=1)
    first = [noisy.judge(f"r{i}", "The movie is", best, worst) for i in range(20)]
    assert first == [noisy.judge(f"r{i}", "The movie is", best, worst) for i in range(20)]  # the same after a restart
    assert len(set(first)) > 1  # raters differ


def test_only_valid_pairs_are_chosen_and_counted():
    scores = np.array([[[0.0, 0.0, 5.0], [0.0, 1.0, 2.0]]])  # (0, 1) of prompt 0 has margin 0: margin's first pick
    valid = np.array([[False, True, True], [True, True, True]])  # but its texts are equal, say
    assert choose_pairs(scores, 2, "margin", valid=valid)[0] != (0, 0, 1)
    assert (0, 0, 1) not in choose_pairs(scores, 2, "margin", valid=valid)
    with pytest.raises(ValueError, match="hold 1"):
        choose_pairs(scores, 2, "margin", valid=np.array([[False] * 3, [True] * 3]))


def load_script(relative_path: str):
    """A script of the repository (not a package module), imported by its path."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_train_rounds_leaves_out_equal_and_unfinished_pairs():
    script = load_script("train_rounds.py")
    candidates = [dict(prompt="p", responses=["a", "a", "b"], ended=[True, True, True]),
                  dict(prompt="q", responses=["a", "b", "c"], ended=[True, False, True]),
                  dict(prompt="r", responses=["", " ", "c"], ended=[True, True, True])]  # ended at once: nothing to read
    # pairs (0, 1), (0, 2), (1, 2)
    assert script.valid_pairs(candidates).tolist() == [[False, True, True], [False, True, False], [False, False, False]]


def test_the_rounds_figures_measure_distance_from_the_seeds_frontier(tmp_path):
    script = load_script("benchmarks/rounds.py")
    seeds = tmp_path / "frontier.csv"
    seeds.write_text("name,vader,kl\nLM,0.1,0\nppo@s0,0.3,4\nppo@s1,0.4,6\nppo@s2,0.5,8\n")  # VADER = 0.1 + 0.05 KL
    a, b, spread = script.seeds_frontier(seeds)
    assert (a, b) == (pytest.approx(0.1), pytest.approx(0.05)) and spread == pytest.approx(0, abs=1e-9)


def test_a_reward_model_over_seeds_is_summarised_above_the_baselines_line(tmp_path, capsys):
    script = load_script("benchmarks/rounds.py")
    seeds = tmp_path / "frontier.csv"
    # round0 on VADER = 0.1 + 0.05 KL; dis1's seeds lie 0.02 and 0.04 above it, at other KLs
    seeds.write_text("name,vader,gold,kl\nLM,0.1,0,0\nround0@s0,0.3,1,4\nround0@s1,0.5,1,8\n"
                     "dis1@s0,0.42,2,6\ndis1@s1,0.54,4,8\n")
    with pytest.raises(SystemExit, match="at least 2 rows named ppo@sS"):
        script.seeds_frontier(seeds)
    script.print_seeded(seeds, script.seeds_frontier(seeds, "round0"))
    dis1 = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| dis1 "))
    # mean above 0.03, SE over the seeds sd(0.02, 0.04) / sqrt(2) = 0.01; gold 3 (sd 1.414)
    assert dis1 == "| dis1 | 2 | 0.480 (sd 0.085) | 3.000 (sd 1.414) | 7.000 (sd 1.414) | +0.030 ± 0.010 |"
