import sys

from image_autoencoding.cli import main

if __name__ == "__main__":
    sys.exit(main())
