"""Progressive rollout controller: shadow -> canary steps -> 100 % -> stable, judged at each step, rolled back on a
breach. ``python -m services.rollout``; see services/rollout/controller.py and DEVELOPERS.md "Rollout controller"."""
