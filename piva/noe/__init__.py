"""The Noe benchmark: data preparation, the resumable runner and its leaderboards."""
