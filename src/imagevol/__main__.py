from imagevol.cli import main

main()
