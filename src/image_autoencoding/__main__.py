import sys

from image_autoencoding.cli import main

sys.exit(main())
