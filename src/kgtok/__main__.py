from kgtok.cli import main

main()
