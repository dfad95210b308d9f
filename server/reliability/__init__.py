"""Reliability runs against a live `emote serve`: a WHIP test peer, an impairing UDP relay, impairment, churn and soak."""
