"""python -m bevtrain.data.synthetic --out DIR: see bevtrain.data.synthetic."""

from bevtrain.data.synthetic import main

if __name__ == "__main__":
    main()
