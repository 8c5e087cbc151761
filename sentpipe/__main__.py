from sentpipe.cli import main

main()
