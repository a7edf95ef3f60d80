"""Tasks: prompt datasets (:mod:`.prompts`) and objectives / reward models (:mod:`.objectives`,
:mod:`.hf_rewards`)."""
