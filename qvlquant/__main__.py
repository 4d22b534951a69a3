"""``python -m qvlquant ...`` (what torchrun and ``--nproc`` start): the same CLI as the ``qvlquant`` command."""

import sys

from qvlquant.cli import main

sys.exit(main())
