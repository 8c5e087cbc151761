from sentpipe.launch import main

main()
