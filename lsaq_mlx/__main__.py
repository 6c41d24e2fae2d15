from lsaq_mlx.cli import main

main()
