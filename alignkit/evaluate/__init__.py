"""Evaluation: policies side by side (gold and proxy reward, KL, win rate, diversity, alignment tax),
the pairwise arena (Elo, Bradley-Terry) and the HTML report."""
