.PHONY: reliability

# The reliability suite (slow variants included) and its table; see scripts/reliability.sh.
reliability:
	bash scripts/reliability.sh
