"""The daemon's exit statuses: the unit file does not restart it on the ones a restart cannot mend
(``processor/systemd.py``), and operators read them in docs/operations.md."""

EXIT_USER = 1  # the command could not do what was asked (or another daemon holds the folders)
EXIT_CONFIGURATION = 2  # the settings cannot work
EXIT_DATABASE = 3  # the database is damaged, or of a schema this version cannot use
EXIT_RESTART = 75  # SIGHUP: stopped at a checkpoint to be started again (systemd restarts it at once)
