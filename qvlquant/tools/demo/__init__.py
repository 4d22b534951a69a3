"""The scripts that built the embedded demo model and the test bed (qvlquant.assets)."""
