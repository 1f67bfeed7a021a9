"""Infrastructure every feature uses: settings, the database, the models, errors, logging,
the config cache and the broker."""
